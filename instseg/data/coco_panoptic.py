"""COCO-panoptic datasets (Detectron2's ``load_coco_panoptic_json`` / ``register_coco_panoptic``,
``detectron2/data/datasets/coco_panoptic.py``, and its built-in ``coco_2017_{train,val}_panoptic``).

Layout under ``$INSTSEG_DATASETS`` (the official ``panoptic_annotations_trainval2017.zip`` unpacked
as Detectron2 expects)::

    coco/{train,val}2017/*.jpg
    coco/panoptic_{train,val}2017.json
    coco/panoptic_{train,val}2017/*.png        (RGB, segment id = R + 256 G + 256^2 B)

Dataset dict (one per annotation of the json, in its order)::

    {"file_name": str (image_root / the image entry's file_name), "image_id": int,
     "height": int, "width": int (the image entry's),
     "pan_seg_file_name": str (panoptic_root / the annotation's file_name),
     "segments_info": [{"id": int, "category_id": int (CONTIGUOUS), "iscrowd": 0 | 1,
                        "isthing": bool, "area", "bbox"}, ...]}

Contiguous ids: ALL categories of the json (things and stuff alike) sorted by id -> 0..C-1
(Detectron2's convention for COCO panoptic training: 133 classes, the 80 things first since their
ids are 1..90 and the stuff ids 92..200). Metadata (Detectron2's ``coco_panoptic_standard``):
``thing_classes`` = ``stuff_classes`` = all C names, ``thing_dataset_id_to_contiguous_id`` for
the things, ``stuff_dataset_id_to_contiguous_id`` for the stuff, ``ignore_label`` 255,
``label_divisor`` 1000, ``evaluator_type="coco_panoptic_seg"``, ``panoptic_root``,
``panoptic_json``, ``image_root``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .catalog import DatasetCatalog, MetadataCatalog
from .coco import COCO_CATEGORIES, _read_json, datasets_root
from .validation import DatasetJSONError

__all__ = [
    "COCO_PANOPTIC_STUFF_CATEGORIES",
    "coco_panoptic_metadata",
    "load_coco_panoptic_json",
    "register_coco_panoptic",
    "register_all_coco_panoptic",
]

EVALUATOR_TYPE = "coco_panoptic_seg"

#: The 53 stuff categories of COCO panoptic 2017 (ids and names of ``panoptic_val2017.json``).
COCO_PANOPTIC_STUFF_CATEGORIES: List[Dict[str, Any]] = [
    {"id": i, "name": n, "isthing": 0}
    for i, n in [
        (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"),
        (109, "curtain"), (112, "door-stuff"), (118, "floor-wood"), (119, "flower"), (122, "fruit"),
        (125, "gravel"), (128, "house"), (130, "light"), (133, "mirror-stuff"), (138, "net"),
        (141, "pillow"), (144, "platform"), (145, "playingfield"), (147, "railroad"), (148, "river"),
        (149, "road"), (151, "roof"), (154, "sand"), (155, "sea"), (156, "shelf"), (159, "snow"),
        (161, "stairs"), (166, "tent"), (168, "towel"), (171, "wall-brick"), (175, "wall-stone"),
        (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"), (180, "window-blind"),
        (181, "window-other"), (184, "tree-merged"), (185, "fence-merged"), (186, "ceiling-merged"),
        (187, "sky-other-merged"), (188, "cabinet-merged"), (189, "table-merged"),
        (190, "floor-other-merged"), (191, "pavement-merged"), (192, "mountain-merged"),
        (193, "grass-merged"), (194, "dirt-merged"), (195, "paper-merged"), (196, "food-other-merged"),
        (197, "building-other-merged"), (198, "rock-merged"), (199, "wall-other-merged"),
        (200, "rug-merged"),
    ]
]  # fmt: skip

_PREDEFINED = {
    "coco_2017_train_panoptic": ("coco/train2017", "coco/panoptic_train2017", "coco/panoptic_train2017.json"),
    "coco_2017_val_panoptic": ("coco/val2017", "coco/panoptic_val2017", "coco/panoptic_val2017.json"),
}


def coco_panoptic_metadata(categories: List[Dict[str, Any]], source: str = "categories") -> Dict[str, Any]:
    """Class metadata of panoptic ``categories`` (``[{"id", "name", "isthing"}, ...]``; module
    docstring). ``source`` is named in errors.

    Raises:
        DatasetJSONError: no categories, a category without integer ``id`` / string ``name``, or
            duplicate ids.
    """
    if not isinstance(categories, list) or not categories:
        raise DatasetJSONError(f"{source}: the panoptic json has no categories", source)
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetJSONError(f"{source}: category #{i} must be {{'id': int, 'name': str, 'isthing': 0|1}}, "
                                   f"got {c!r:.200}", source)
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise DatasetJSONError(f"{source}: duplicate category ids in {sorted(ids)}", source)
    cats = sorted(categories, key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    return {
        "thing_classes": list(names),
        "stuff_classes": list(names),
        "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(cats) if c.get("isthing", 0)},
        "stuff_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(cats) if not c.get("isthing", 0)},
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def _builtin_metadata() -> Dict[str, Any]:
    cats = [{**c, "isthing": 1} for c in COCO_CATEGORIES] + COCO_PANOPTIC_STUFF_CATEGORIES
    return coco_panoptic_metadata(cats, "COCO panoptic 2017 categories")


def load_coco_panoptic_json(panoptic_json: str, image_root: str, panoptic_root: str) -> List[Dict[str, Any]]:
    """Dataset dicts of a COCO-panoptic json (module docstring).

    Raises:
        FileNotFoundError: the json, ``image_root`` or ``panoptic_root`` does not exist (named).
        DatasetJSONError: invalid JSON, no ``annotations`` / ``categories``, an annotation whose
            image is not in ``images``, or a segment with an unknown ``category_id`` (json, image
            and segment named).
    """
    if not os.path.isfile(panoptic_json):
        raise FileNotFoundError(f"COCO panoptic json not found: {panoptic_json}")
    for what, folder in (("image folder", image_root), ("panoptic PNG folder", panoptic_root)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"COCO panoptic {what} not found: {folder} (for {panoptic_json})")
    data = _read_json(panoptic_json)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DatasetJSONError(f"{panoptic_json}: not a COCO panoptic json (no 'annotations' list)", panoptic_json)
    meta = coco_panoptic_metadata(data.get("categories"), panoptic_json)
    contiguous = {**meta["thing_dataset_id_to_contiguous_id"], **meta["stuff_dataset_id_to_contiguous_id"]}
    things = meta["thing_dataset_id_to_contiguous_id"]
    images = {im.get("id"): im for im in data.get("images", []) if isinstance(im, dict)}
    out = []
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        img = images.get(image_id)
        if img is None:
            raise DatasetJSONError(f"{panoptic_json}: annotation {ann.get('file_name')!r} has image_id {image_id!r}, "
                                   "which is not in 'images'", panoptic_json)
        segments = []
        for s in ann.get("segments_info", []):
            cat = s.get("category_id")
            if cat not in contiguous:
                raise DatasetJSONError(f"{panoptic_json}: image {image_id} segment {s.get('id')} has category_id "
                                       f"{cat!r}, not one of the json's categories", panoptic_json)
            segments.append({**s, "category_id": contiguous[cat], "iscrowd": int(s.get("iscrowd", 0)),
                             "isthing": cat in things})
        out.append({
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": image_id,
            "height": int(img["height"]),
            "width": int(img["width"]),
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        })
    return out


class _PanopticLoader:
    """Picklable, comparable ``() -> load_coco_panoptic_json(json, image_root, panoptic_root)``."""

    def __init__(self, panoptic_json: str, image_root: str, panoptic_root: str) -> None:
        self.key = (panoptic_json, image_root, panoptic_root)

    def __call__(self) -> List[dict]:
        return load_coco_panoptic_json(*self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PanopticLoader) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"load_coco_panoptic_json{self.key!r}"


def register_coco_panoptic(name: str, image_root: str, panoptic_root: str, panoptic_json: str,
                           metadata: Optional[Dict[str, Any]] = None) -> None:
    """Register a COCO-panoptic dataset under ``name`` (loaded lazily, :func:`load_coco_panoptic_json`).

    Metadata: ``image_root``, ``panoptic_root``, ``panoptic_json`` (absolute paths),
    ``evaluator_type="coco_panoptic_seg"``, ``ignore_label`` 255, ``label_divisor`` 1000, and the
    class fields of :func:`coco_panoptic_metadata`: from ``metadata`` when it has
    ``stuff_classes``, else read from the json's categories (lazily when the json does not exist yet).

    Raises:
        ValueError: ``name`` is already registered with other files.
    """
    image_root, panoptic_root, panoptic_json = (
        os.path.abspath(os.path.expanduser(str(p))) for p in (image_root, panoptic_root, panoptic_json))
    DatasetCatalog.register(name, _PanopticLoader(panoptic_json, image_root, panoptic_root))
    meta = MetadataCatalog.get(name)
    meta.set(**{"image_root": image_root, "panoptic_root": panoptic_root, "panoptic_json": panoptic_json,
                "evaluator_type": EVALUATOR_TYPE, "ignore_label": 255, "label_divisor": 1000, **(metadata or {})})
    if meta.has("stuff_classes"):
        return
    cache: Dict[str, Any] = {}

    def from_json(key: str):
        if not cache:
            data = _read_json(panoptic_json)
            cache.update(coco_panoptic_metadata(data.get("categories") if isinstance(data, dict) else None,
                                                panoptic_json))
        return cache[key]

    for key in ("thing_classes", "stuff_classes", "thing_dataset_id_to_contiguous_id",
                "stuff_dataset_id_to_contiguous_id"):
        if not meta.has(key):
            meta.set_lazy(key, lambda key=key: from_json(key))


def register_all_coco_panoptic(root: Optional[str] = None) -> None:
    """Register ``coco_2017_{train,val}_panoptic`` under ``root`` (default :func:`datasets_root`)
    with the 133 COCO panoptic classes known without reading the json."""
    root = datasets_root() if root is None else root
    meta = _builtin_metadata()
    for name, (image_dir, pan_dir, json_rel) in _PREDEFINED.items():
        if name not in DatasetCatalog:
            register_coco_panoptic(name, os.path.join(root, image_dir), os.path.join(root, pan_dir),
                                   os.path.join(root, json_rel), metadata=meta)
