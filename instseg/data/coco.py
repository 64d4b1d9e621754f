"""COCO-format instance datasets: loading a json into dataset dicts and registering it by name.

Dataset dict (docs/architecture.md, "Data contract")::

    {"file_name": str (absolute path), "image_id": int, "height": int, "width": int,
     "annotations": [{"bbox": [x, y, w, h] (float, pixels), "bbox_mode": "XYWH_ABS",
                      "category_id": int (contiguous, 0..C-1, in the order of the json's sorted
                      category ids), "segmentation": list of polygons | RLE dict,
                      "iscrowd": 0 | 1}, ...]}
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import mmap
import os
from typing import Any, Dict, List, Optional, Tuple

from .catalog import DatasetCatalog, MetadataCatalog

__all__ = [
    "load_coco_json",
    "register_coco_instances",
    "read_coco_categories",
    "COCO_CATEGORIES",
    "register_all_coco",
]

logger = logging.getLogger(__name__)


def _categories_to_meta(cats: List[Dict[str, Any]], json_file: str) -> Dict[str, Any]:
    """``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` from COCO ``categories``."""
    if not cats:
        raise ValueError(f"{json_file}: the json has no categories")
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{json_file}: duplicate category ids in {sorted(ids)}")
    cats = sorted(cats, key=lambda c: int(c["id"]))
    return {
        "thing_classes": [str(c["name"]) for c in cats],
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(cats)},
    }


def read_coco_categories(json_file: str) -> Dict[str, Any]:
    """Read only the categories of a COCO json, cheaply, and return the class metadata.

    Returns ``{"thing_classes": list[str], "thing_dataset_id_to_contiguous_id": dict[int, int]}``
    (contiguous ids follow the sorted json category ids). A big file (e.g. COCO train, 450 MB) is
    not parsed as a whole: the ``"categories"`` list is located in the raw bytes (memory-mapped)
    and decoded alone; when that fails the whole file is parsed.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: the json has no usable ``categories``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file not found: {json_file}")
    if os.path.getsize(json_file) > 16 * 2**20:
        cats = _find_categories_fast(json_file)
        if cats is not None:
            return _categories_to_meta(cats, json_file)
    with open(json_file, "r") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "categories" not in data:
        raise ValueError(f"{json_file}: not a COCO instances json (no 'categories' key)")
    return _categories_to_meta(data["categories"], json_file)


def _find_categories_fast(json_file: str) -> Optional[List[Dict[str, Any]]]:
    key = b'"categories"'
    decoder = json.JSONDecoder()
    with open(json_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # Official COCO files put "categories" last; try the last occurrence, then the first.
        for pos in dict.fromkeys([mm.rfind(key), mm.find(key)]):
            if pos < 0:
                continue
            # Skip to the value after the colon.
            start = pos + len(key)
            chunk = mm[start : start + 4 * 2**20].decode("utf-8", errors="replace")
            stripped = chunk.lstrip()
            if not stripped.startswith(":"):
                continue
            value_text = stripped[1:].lstrip()
            try:
                cats, _ = decoder.raw_decode(value_text)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(cats, list)
                and cats
                and all(isinstance(c, dict) and "id" in c and "name" in c for c in cats)
            ):
                return cats
    return None


def _valid_polygons(segm: List[Any]) -> List[List[float]]:
    """Polygons with an even number (>= 6) of coordinates, as float lists."""
    out = []
    for poly in segm:
        if isinstance(poly, (list, tuple)) and len(poly) % 2 == 0 and len(poly) >= 6:
            out.append([float(v) for v in poly])
    return out


def load_coco_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Load a COCO instances json into a list of dataset dicts (docs/architecture.md, "Data contract").

    Args:
        json_file: path of the COCO instances json.
        image_root: folder that the images' ``file_name`` are relative to.
        dataset_name: when given, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` are
            set in ``MetadataCatalog.get(dataset_name)``.

    Returns:
        One dict per image, in the json's image order: ``file_name`` (absolute path),
        ``image_id``, ``height``, ``width`` (pixels), ``annotations``: list of
        ``{"bbox": [x, y, w, h] float pixels, "bbox_mode": "XYWH_ABS", "category_id": int in
        0..C-1 (contiguous, sorted json category ids), "segmentation": list of polygons (each a
        flat ``[x0, y0, x1, y1, ...]`` float list) or an RLE dict, "iscrowd": 0 | 1}``.
        Images without annotations are kept (the training loader filters them).

    Skips (documented, counted in one logged warning): polygons with fewer than 3 points (or an
    odd number of coordinates) are dropped from an annotation; an annotation left without any
    valid polygon, or without a ``segmentation``, is dropped. Annotations with ``"ignore": 1``
    are dropped silently.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: an annotation refers to a category id that the json does not define, or an
            image entry has no ``height``/``width``.
    """
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file not found: {json_file}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(json_file)

    meta = _categories_to_meta(coco.loadCats(coco.getCatIds()), json_file)
    id_map: Dict[int, int] = meta["thing_dataset_id_to_contiguous_id"]
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(**meta)

    image_root = os.path.abspath(os.path.expanduser(image_root))
    img_ids = [img["id"] for img in coco.dataset.get("images", [])]
    n_poly_dropped = n_ann_no_valid_poly = n_ann_no_segm = 0
    dataset_dicts: List[dict] = []
    for img_id in img_ids:
        img = coco.imgs[img_id]
        if "height" not in img or "width" not in img:
            raise ValueError(f"{json_file}: image id {img_id} has no height/width")
        h, w = int(img["height"]), int(img["width"])
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": img_id,
            "height": h,
            "width": w,
        }
        objs = []
        for anno in coco.imgToAnns.get(img_id, []):
            if anno.get("ignore", 0):
                continue
            cat = anno["category_id"]
            if cat not in id_map:
                raise ValueError(
                    f"{json_file}: annotation {anno.get('id')} of image {img_id} has category_id "
                    f"{cat}, which is not among the json's categories {sorted(id_map)}"
                )
            segm = anno.get("segmentation")
            if segm is None or (isinstance(segm, list) and len(segm) == 0):
                n_ann_no_segm += 1
                continue
            if isinstance(segm, dict):
                if isinstance(segm.get("counts"), list):  # uncompressed RLE -> compressed
                    size = segm.get("size", [h, w])
                    segm = mask_util.frPyObjects(segm, int(size[0]), int(size[1]))
                else:
                    segm = dict(segm)
            else:
                valid = _valid_polygons(segm)
                n_poly_dropped += len(segm) - len(valid)
                if not valid:
                    n_ann_no_valid_poly += 1
                    continue
                segm = valid
            objs.append(
                {
                    "bbox": [float(v) for v in anno["bbox"]],
                    "bbox_mode": "XYWH_ABS",
                    "category_id": id_map[cat],
                    "segmentation": segm,
                    "iscrowd": int(anno.get("iscrowd", 0)),
                }
            )
        record["annotations"] = objs
        dataset_dicts.append(record)

    if n_poly_dropped or n_ann_no_segm:
        logger.warning(
            "%s: dropped %d degenerate polygon(s) (fewer than 3 points); dropped %d annotation(s) "
            "left without a valid polygon and %d annotation(s) without segmentation.",
            json_file,
            n_poly_dropped,
            n_ann_no_valid_poly,
            n_ann_no_segm,
        )
    logger.info("Loaded %d images from %s", len(dataset_dicts), json_file)
    return dataset_dicts


class _CocoLoader:
    """Picklable, comparable loader ``() -> load_coco_json(json_file, image_root, name)``."""

    def __init__(self, name: str, json_file: str, image_root: str) -> None:
        self.name, self.json_file, self.image_root = name, json_file, image_root

    def _key(self) -> Tuple[str, str, str]:
        return (self.name, self.json_file, self.image_root)

    def __call__(self) -> List[dict]:
        return load_coco_json(self.json_file, self.image_root, self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CocoLoader) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"load_coco_json({self.json_file!r}, {self.image_root!r})"


def register_coco_instances(
    name: str, json_file: str, image_root: str, metadata: Optional[Dict[str, Any]] = None
) -> None:
    """Register a COCO-format instance dataset under ``name`` (loaded lazily).

    ``MetadataCatalog.get(name)`` gets ``json_file`` and ``image_root`` (absolute paths),
    ``evaluator_type="coco"`` and, right away, ``thing_classes`` and
    ``thing_dataset_id_to_contiguous_id`` read cheaply from the json's categories (when the json
    does not exist yet, they are read on first access). ``metadata`` adds fields (e.g.
    ``thing_classes`` known in advance, so that the json is not read at registration).

    Registering the same name again with the same files is a no-op.

    Raises:
        ValueError: ``name`` is already registered with other files (or other metadata).
    """
    json_file = os.path.abspath(os.path.expanduser(str(json_file)))
    image_root = os.path.abspath(os.path.expanduser(str(image_root)))
    loader = _CocoLoader(name, json_file, image_root)
    if name in DatasetCatalog:
        meta = MetadataCatalog.get(name)
        old = (meta.get("json_file"), meta.get("image_root"))
        if DatasetCatalog._fns.get(name) != loader:
            raise ValueError(
                f"Dataset {name!r} is already registered (json_file={old[0]!r}, image_root="
                f"{old[1]!r}); cannot register it again with json_file={json_file!r}, "
                f"image_root={image_root!r}. Use another name."
            )
    DatasetCatalog.register(name, loader)
    meta = MetadataCatalog.get(name)
    meta.set(json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {}))
    if not meta.has("thing_classes"):
        if os.path.isfile(json_file):
            meta.set(**read_coco_categories(json_file))
        else:
            meta.set_lazy("thing_classes", lambda: read_coco_categories(json_file)["thing_classes"])
            meta.set_lazy(
                "thing_dataset_id_to_contiguous_id",
                lambda: read_coco_categories(json_file)["thing_dataset_id_to_contiguous_id"],
            )


# The 80 COCO thing categories (official ids, with gaps), as in the COCO 2017 instances json.
COCO_CATEGORIES: List[Dict[str, Any]] = [
    {"id": i, "name": n}
    for i, n in [
        (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
        (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
        (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"),
        (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
        (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
        (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
        (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
        (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
        (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
        (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
        (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
        (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
        (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
        (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
        (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
        (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
        (89, "hair drier"), (90, "toothbrush"),
    ]
]  # fmt: skip

# name -> (image folder, json file), relative to the datasets root.
_PREDEFINED_COCO = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def datasets_root() -> str:
    """``$INSTSEG_DATASETS`` (default ``./datasets``) as an absolute path."""
    return os.path.abspath(os.path.expanduser(os.environ.get("INSTSEG_DATASETS", "datasets")))


def register_all_coco(root: Optional[str] = None) -> None:
    """Register ``coco_2017_train`` / ``coco_2017_val`` under ``root`` (default
    :func:`datasets_root`), with the 80 COCO classes known without reading the json."""
    root = datasets_root() if root is None else root
    meta = _categories_to_meta(COCO_CATEGORIES, "COCO_CATEGORIES")
    for name, (image_dir, json_rel) in _PREDEFINED_COCO.items():
        if name in DatasetCatalog:
            continue
        register_coco_instances(
            name, os.path.join(root, json_rel), os.path.join(root, image_dir), metadata=meta
        )
