"""COCO-format instance datasets: loading a json into dataset dicts and registering it by name.

Dataset dict (docs/architecture.md, "Data contract")::

    {"file_name": str (absolute path), "image_id": int, "height": int, "width": int,
     "annotations": [{"bbox": [x, y, w, h] (float, pixels), "bbox_mode": "XYWH_ABS",
                      "category_id": int (contiguous, 0..C-1, in the order of the json's sorted
                      category ids), "segmentation": list of polygons | RLE dict,
                      "iscrowd": 0 | 1}, ...]}
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
from typing import Any, Dict, List, Optional, Tuple

from .catalog import DatasetCatalog, MetadataCatalog
from .polygons import coordinate_margin
from .validation import (
    AnnotationError,
    DatasetJSONError,
    Defect,
    _is_int,
    _summarize,
    check_bbox,
    check_polygons,
    check_rle,
    iter_problems,
    location,
)

__all__ = [
    "load_coco_json",
    "register_coco_instances",
    "read_coco_categories",
    "COCO_CATEGORIES",
    "register_all_coco",
]

logger = logging.getLogger(__name__)


def _categories_to_meta(cats: List[Dict[str, Any]], json_file: str) -> Dict[str, Any]:
    """``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` from COCO ``categories``.

    Raises:
        DatasetJSONError: no categories, a category that is not ``{"id": int, "name": str}``, or
            duplicate category ids (the message names the file).
    """
    if not isinstance(cats, list) or not cats:
        raise DatasetJSONError(f"{json_file}: the json has no categories", json_file)
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetJSONError(
                f"{json_file}: category #{i} must be {{'id': int, 'name': str, ...}}, got {c!r:.200}", json_file)
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise DatasetJSONError(f"{json_file}: duplicate category ids in {sorted(ids)}", json_file)
    cats = sorted(cats, key=lambda c: int(c["id"]))
    return {
        "thing_classes": [str(c["name"]) for c in cats],
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(cats)},
    }


def _read_json(json_file: str) -> Any:
    """``json.load`` of ``json_file``; invalid JSON -> :class:`DatasetJSONError` naming the file,
    line and column."""
    try:
        with open(json_file, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetJSONError(
            f"{json_file}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}", json_file
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetJSONError(f"{json_file}: not a UTF-8 json file ({e})", json_file) from None


def read_coco_categories(json_file: str) -> Dict[str, Any]:
    """Read only the categories of a COCO json, cheaply, and return the class metadata.

    Returns ``{"thing_classes": list[str], "thing_dataset_id_to_contiguous_id": dict[int, int]}``
    (contiguous ids follow the sorted json category ids). A big file (e.g. COCO train, 450 MB) is
    not parsed as a whole: the ``"categories"`` list is located in the raw bytes (memory-mapped)
    and decoded alone; when that fails the whole file is parsed.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        DatasetJSONError: (a ``ValueError``) invalid JSON (file, line and column named), or no
            usable ``categories``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file not found: {json_file}")
    if os.path.getsize(json_file) > 16 * 2**20:
        cats = _find_categories_fast(json_file)
        if cats is not None:
            return _categories_to_meta(cats, json_file)
    data = _read_json(json_file)
    if not isinstance(data, dict) or "categories" not in data:
        raise DatasetJSONError(f"{json_file}: not a COCO instances json (no 'categories' key)", json_file)
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


def _image_size(img: Dict[str, Any], key: str) -> int:
    v = img.get(key)
    if _is_int(v) and v > 0:
        return int(v)
    if isinstance(v, float) and math.isfinite(v) and v > 0 and v == int(v):
        return int(v)  # 480.0, as some converters write
    if v is None:
        raise Defect(f"has no '{key}'")
    raise Defect(f"'{key}' must be a positive integer (pixels), got {v!r}")


def load_coco_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Load a COCO instances json into a list of dataset dicts (docs/architecture.md, "Data contract"),
    validating every image and annotation entry.

    Args:
        json_file: path of the COCO instances json.
        image_root: folder that the images' ``file_name`` are relative to.
        dataset_name: when given, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` are
            set in ``MetadataCatalog.get(dataset_name)``.

    Returns:
        One dict per image, in the json's image order: ``file_name`` (absolute path),
        ``image_id``, ``height``, ``width`` (pixels), ``annotations``: list of
        ``{"id": the json's annotation id, "bbox": [x, y, w, h] float pixels, "bbox_mode":
        "XYWH_ABS", "category_id": int in 0..C-1 (contiguous, sorted json category ids),
        "segmentation": list of polygons (each a flat ``[x0, y0, x1, y1, ...]`` list of numbers:
        the json's list when it holds floats, converted to floats when all are integers) or
        an RLE dict (compressed), "iscrowd": 0 | 1}``. Images without annotations are kept (the
        training loader filters them).

    Validation (errors, all found at once, :class:`AnnotationError`): an image entry must have
    a unique integer ``id``, a non-empty string ``file_name`` and positive integer ``height`` and
    ``width`` (``480.0`` is accepted); an annotation must have a unique integer ``id``, an
    integer ``image_id``, a ``category_id`` among the json's categories, a ``bbox`` of 4 finite
    numbers with non-negative width and height, ``iscrowd`` 0/1 when present, and a
    ``segmentation`` that is a list of polygons (flat lists of finite numbers) or an RLE dict
    whose ``size`` is the image's ``[height, width]`` and whose runs cover it exactly. NaN and
    Inf coordinates are errors.

    Repairs (counted in one logged warning with the first examples): polygons with fewer than
    3 points (or an odd number of coordinates) are dropped from an annotation; an annotation
    left without any valid polygon, or without a ``segmentation``, is dropped; polygon
    coordinates and boxes more than ``max(H, W)`` pixels outside the image are clipped to that
    margin (:func:`instseg.data.polygons.clip_polygons_to_margin`; the mask inside the image
    does not change); annotations of an ``image_id`` that is not among the images are ignored.
    Annotations with ``"ignore": 1`` are dropped silently.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        DatasetJSONError: (a ``ValueError``) invalid JSON (the message gives line and column),
            not a COCO json (no ``images`` list), or invalid ``categories``.
        AnnotationError: (a ``ValueError``) invalid image or annotation entries; every message
            has the form ``"FILE: image ID (FILE_NAME) annotation ID: PROBLEM"``
            (:func:`instseg.data.validation.location`); the exception lists the first 20 and
            keeps all in ``.problems``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file not found: {json_file}")
    data = _read_json(json_file)
    if not isinstance(data, dict):
        raise DatasetJSONError(f"{json_file}: not a COCO instances json (the top level is a "
                               f"{type(data).__name__}, not an object)", json_file)
    images = data.get("images")
    annotations = data.get("annotations", [])
    if not isinstance(images, list):
        raise DatasetJSONError(f"{json_file}: not a COCO instances json (no 'images' list)", json_file)
    if not isinstance(annotations, list):
        raise DatasetJSONError(f"{json_file}: 'annotations' must be a list, got {type(annotations).__name__}",
                               json_file)
    meta = _categories_to_meta(data.get("categories"), json_file)
    id_map: Dict[int, int] = meta["thing_dataset_id_to_contiguous_id"]
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(**meta)

    image_root = os.path.abspath(os.path.expanduser(image_root))
    problems: List[str] = []
    first: Dict[str, Any] = {}

    def problem(msg: str, image_id: Any = None, annotation_id: Any = None) -> None:
        if not problems:
            first.update(image_id=image_id, annotation_id=annotation_id)
        problems.append(msg)

    # images
    records: Dict[int, dict] = {}
    order: List[int] = []
    for i, img in enumerate(images):
        img_id = img.get("id") if isinstance(img, dict) else None
        fname = img.get("file_name") if isinstance(img, dict) else None
        loc = location(json_file, img_id if img_id is not None else f"#{i}",
                       fname if isinstance(fname, str) else None)
        try:
            if not isinstance(img, dict):
                raise Defect(f"image entry must be an object, got {type(img).__name__}")
            if not _is_int(img_id):
                raise Defect(f"image 'id' must be an integer, got {img_id!r}")
            if img_id in records:
                raise Defect(f"duplicate image id {img_id} (also image #{order.index(img_id)} of the json)")
            if not isinstance(fname, str) or not fname:
                raise Defect(f"image 'file_name' must be a non-empty string, got {fname!r}")
            h, w = _image_size(img, "height"), _image_size(img, "width")
        except Defect as e:
            problem(f"{loc}: {e}", image_id=img_id)
            continue
        records[img_id] = {"file_name": os.path.join(image_root, fname), "image_id": img_id, "height": h,
                           "width": w, "annotations": [], "_name": fname}
        order.append(img_id)

    # annotations
    counts = dict(poly_dropped=0, ann_no_valid_poly=0, ann_no_segm=0, clipped=0, unknown_image=0)
    examples: List[str] = []
    seen_ann: Dict[Any, int] = {}
    for j, anno in enumerate(annotations):
        if not isinstance(anno, dict):
            problem(f"{location(json_file, annotation_index=j)}: annotation entry must be an object, got "
                    f"{type(anno).__name__}")
            continue
        ann_id, img_id = anno.get("id"), anno.get("image_id")
        rec = records.get(img_id) if _is_int(img_id) else None
        def loc(img_id=img_id, rec=rec, ann_id=ann_id, j=j) -> str:  # built only for messages
            return location(json_file, img_id, rec["_name"] if rec else None, ann_id,
                            None if ann_id is not None else j)

        try:
            if not _is_int(ann_id):
                raise Defect(f"annotation 'id' must be an integer, got {ann_id!r}")
            if ann_id in seen_ann:
                raise Defect(f"duplicate annotation id {ann_id} (also annotation #{seen_ann[ann_id]} of the json)")
            seen_ann[ann_id] = j
            if not _is_int(img_id):
                raise Defect(f"annotation 'image_id' must be an integer, got {img_id!r}")
            if anno.get("ignore", 0):
                continue
            cat = anno.get("category_id")
            if cat is None:
                raise Defect("annotation has no 'category_id'")
            if not _is_int(cat) or cat not in id_map:
                raise Defect(f"category_id {cat!r} is not among the json's categories {sorted(id_map)}")
            iscrowd = anno.get("iscrowd", 0)
            if iscrowd not in (0, 1) or isinstance(iscrowd, float):
                raise Defect(f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
            if "bbox" not in anno:
                raise Defect("annotation has no 'bbox' ([x, y, width, height] pixels)")
            if rec is None:
                counts["unknown_image"] += 1
                if len(examples) < 5:
                    examples.append(f"{loc()}: image id not in the json's images (ignored)")
                continue
            h, w = rec["height"], rec["width"]
            bbox, bbox_clipped = check_bbox(anno["bbox"], h, w)
            segm = anno.get("segmentation")
            if segm is None or (isinstance(segm, list) and len(segm) == 0):
                counts["ann_no_segm"] += 1
                if len(examples) < 5:
                    examples.append(f"{loc()}: no segmentation (dropped)")
                continue
            if isinstance(segm, dict):
                segm = check_rle(segm, h, w)
                clipped = False
            else:
                n_before = len(segm) if isinstance(segm, list) else 0
                segm, dropped, clipped = check_polygons(segm, h, w)
                counts["poly_dropped"] += dropped
                if not segm:
                    counts["ann_no_valid_poly"] += 1
                    if len(examples) < 5:
                        examples.append(f"{loc()}: no polygon with 3 or more points{' after clipping' if clipped else ''}"
                                        f" (of {n_before}; dropped)")
                    continue
            if clipped or bbox_clipped:
                counts["clipped"] += 1
                if len(examples) < 5:
                    examples.append(f"{loc()}: coordinates more than {coordinate_margin(h, w)} px (max(H, W)) "
                                    "outside the image clipped")
        except Defect as e:
            problem(f"{loc()}: {e}", image_id=img_id, annotation_id=ann_id)
            continue
        rec["annotations"].append({
            "id": ann_id,
            "bbox": bbox,
            "bbox_mode": "XYWH_ABS",
            "category_id": id_map[cat],
            "segmentation": segm,
            "iscrowd": int(iscrowd),
        })

    if problems:
        n = len(problems)
        head = problems[0] if n == 1 else (
            f"{json_file}: {n} invalid image/annotation entries (tools/check_dataset.py lists them all):\n"
            + iter_problems(problems, 20))
        raise AnnotationError(head, json_file=json_file, problems=problems, **first)
    summary = _summarize(json_file, counts, examples)
    if summary:
        logger.warning(summary)
    dataset_dicts = []
    for img_id in order:
        rec = records[img_id]
        del rec["_name"]
        dataset_dicts.append(rec)
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
