"""Cityscapes semantic and panoptic segmentation datasets (Detectron2's names and layouts).

Both need the files ``datasets/prepare_cityscapes.py ROOT`` writes (cityscapesscripts'
``createTrainIdLabelImgs`` and ``createPanopticImgs``)::

    ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<stem>_gtFine_polygons.json, <stem>_gtFine_labelTrainIds.png
    ROOT/gtFine/cityscapes_panoptic_<split>.json, ROOT/gtFine/cityscapes_panoptic_<split>/<stem>_gtFine_panoptic.png

Built-in names (registered when :mod:`instseg.data` is imported, ``ROOT`` =
``$INSTSEG_DATASETS/cityscapes``; nothing is read until used):

- ``cityscapes_fine_sem_seg_{train,val}`` (Detectron2's ``load_cityscapes_semantic``,
  ``detectron2/data/datasets/cityscapes.py``): ``{"file_name", "sem_seg_file_name" (the
  ``_labelTrainIds.png``), "height", "width" (from the polygons json), "image_id"}``;
- ``cityscapes_fine_panoptic_{train,val}`` (Detectron2's ``load_cityscapes_panoptic``,
  ``detectron2/data/datasets/cityscapes_panoptic.py``): ``{"file_name", "image_id", "height",
  "width", "pan_seg_file_name", "sem_seg_file_name", "segments_info": [{"id", "category_id"
  (contiguous = the label's trainId), "iscrowd", "area", "bbox"}, ...]}``, one per annotation of
  the panoptic json.

``image_id`` is ``<city>_<seq>_<frame>`` (Detectron2's panoptic convention and cityscapesscripts'
panoptic ``image_id``; Detectron2's semantic dicts have none).

Classes: the 19 labels of cityscapesscripts' ``labels.py`` with a trainId in 0..18, in trainId
order (road, sidewalk, building, ..., bicycle); contiguous id = trainId. The 8 with
``hasInstances`` are the things.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from .catalog import DatasetCatalog, MetadataCatalog
from .cityscapes import _IMAGE_SUFFIX, CityscapesLabelError, CityscapesLayoutError, _list_files

__all__ = [
    "cityscapes_stuff_metadata",
    "cityscapes_panoptic_metadata",
    "load_cityscapes_semantic",
    "load_cityscapes_panoptic",
    "register_cityscapes_sem_seg",
    "register_cityscapes_panoptic",
    "register_all_cityscapes_seg",
    "panoptic_paths_of_gt_dir",
]

_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
_PREPARE = "run `python datasets/prepare_cityscapes.py ROOT` (ROOT holds leftImg8bit/ and gtFine/)"

_PREDEFINED_SEM_SEG = {
    "cityscapes_fine_sem_seg_train": ("cityscapes/leftImg8bit/train", "cityscapes/gtFine/train"),
    "cityscapes_fine_sem_seg_val": ("cityscapes/leftImg8bit/val", "cityscapes/gtFine/val"),
}
#: name -> (image dir, gt dir, panoptic PNG folder, panoptic json) under the datasets root.
_PREDEFINED_PANOPTIC = {
    f"cityscapes_fine_panoptic_{s}": (f"cityscapes/leftImg8bit/{s}", f"cityscapes/gtFine/{s}",
                                      f"cityscapes/gtFine/cityscapes_panoptic_{s}",
                                      f"cityscapes/gtFine/cityscapes_panoptic_{s}.json")
    for s in ("train", "val")
}

SEM_SEG_EVALUATOR_TYPE = "cityscapes_sem_seg"
PANOPTIC_EVALUATOR_TYPE = "cityscapes_panoptic_seg"


def _train_labels():
    from cityscapesscripts.helpers.labels import labels

    return sorted((lab for lab in labels if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId)


def cityscapes_stuff_metadata() -> Dict[str, Any]:
    """``{"stuff_classes": list[str] (19, trainId order), "stuff_colors": list[(r, g, b)],
    "ignore_label": 255, "thing_classes": the 8 instance classes}`` from cityscapesscripts'
    ``labels.py`` (Detectron2's semantic metadata also carries the 8 ``thing_classes``; the number
    of classes of the semantic task is ``len(stuff_classes)``, see
    :func:`instseg.data.resolve_num_classes`)."""
    from .cityscapes import cityscapes_instance_metadata

    labs = _train_labels()
    return {
        "thing_classes": cityscapes_instance_metadata()["thing_classes"],
        "stuff_classes": [lab.name for lab in labs],
        "stuff_colors": [tuple(int(c) for c in lab.color) for lab in labs],
        "ignore_label": 255,
    }


def cityscapes_panoptic_metadata() -> Dict[str, Any]:
    """The panoptic class metadata (Detectron2's ``register_all_cityscapes_panoptic``): all 19
    names in both ``thing_classes`` and ``stuff_classes`` (and colors), contiguous id = trainId;
    ``thing_dataset_id_to_contiguous_id`` (labelId -> trainId of the 8 things, e.g. 24 -> 11),
    ``stuff_dataset_id_to_contiguous_id`` (the 11 stuff labels, e.g. 7 -> 0), ``ignore_label``
    255, ``label_divisor`` 1000."""
    labs = _train_labels()
    names = [lab.name for lab in labs]
    colors = [tuple(int(c) for c in lab.color) for lab in labs]
    return {
        "thing_classes": list(names), "thing_colors": list(colors),
        "stuff_classes": list(names), "stuff_colors": list(colors),
        "thing_dataset_id_to_contiguous_id": {int(lab.id): int(lab.trainId) for lab in labs if lab.hasInstances},
        "stuff_dataset_id_to_contiguous_id": {int(lab.id): int(lab.trainId) for lab in labs if not lab.hasInstances},
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def _image_id(image_file: str) -> str:
    return "_".join(os.path.basename(image_file)[: -len(_IMAGE_SUFFIX)].split("_")[:3])


def _train_id_file(image_file: str, gt_dir: str) -> str:
    city = os.path.basename(os.path.dirname(image_file))
    stem = os.path.basename(image_file)[: -len(_IMAGE_SUFFIX)]
    return os.path.join(gt_dir, city, stem + _TRAIN_ID_SUFFIX)


def _missing_train_ids(label_file: str) -> CityscapesLayoutError:
    return CityscapesLayoutError(f"{label_file} not found: the _gtFine_labelTrainIds.png files are missing; {_PREPARE}")


def load_cityscapes_semantic(image_dir: str, gt_dir: str) -> List[Dict[str, Any]]:
    """One dict per image of a Cityscapes split (module docstring), sorted by city and file name.

    Raises:
        CityscapesLayoutError: a folder missing, an image without its ``_gtFine_polygons.json`` or
            ``_gtFine_labelTrainIds.png`` (named; the message says to run prepare_cityscapes.py),
            or an unreadable polygons json (named).
    """
    image_dir = os.path.abspath(os.path.expanduser(str(image_dir)))
    gt_dir = os.path.abspath(os.path.expanduser(str(gt_dir)))
    out = []
    for image_file, _, json_file in _list_files(image_dir, gt_dir, from_json=True):
        label_file = _train_id_file(image_file, gt_dir)
        if not os.path.isfile(label_file):
            raise _missing_train_ids(label_file)
        try:
            with open(json_file, "r", encoding="utf-8") as f:
                obj = json.load(f)
            height, width = int(obj["imgHeight"]), int(obj["imgWidth"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CityscapesLayoutError(f"{json_file}: cannot read imgHeight/imgWidth ({type(e).__name__}: {e})") from None
        out.append({"file_name": image_file, "sem_seg_file_name": label_file, "height": height,
                    "width": width, "image_id": _image_id(image_file)})
    return out


def load_cityscapes_panoptic(image_dir: str, gt_dir: str, panoptic_root: str, panoptic_json: str,
                             meta: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """One dict per annotation of ``panoptic_json`` (module docstring), in the json's order.

    Args:
        image_dir: ``leftImg8bit/<split>`` (city folders).
        gt_dir: ``gtFine/<split>`` (for the ``_labelTrainIds.png``).
        panoptic_root: folder of the panoptic PNGs (``gtFine/cityscapes_panoptic_<split>``).
        panoptic_json: ``gtFine/cityscapes_panoptic_<split>.json``.
        meta: the id maps (default :func:`cityscapes_panoptic_metadata`).

    Raises:
        CityscapesLayoutError: the image folder, the json, the PNG folder, a panoptic PNG or a
            labelTrainIds PNG missing (named; the message says to run prepare_cityscapes.py), an
            unreadable json, or an annotation whose image is not in ``image_dir``.
        CityscapesLabelError: a segment's ``category_id`` is not one of the 19 classes (json named).
    """
    meta = cityscapes_panoptic_metadata() if meta is None else meta
    image_dir, gt_dir, panoptic_root, panoptic_json = (
        os.path.abspath(os.path.expanduser(str(p))) for p in (image_dir, gt_dir, panoptic_root, panoptic_json))
    if not os.path.isdir(image_dir):
        raise CityscapesLayoutError(f"Cityscapes image folder not found: {image_dir} (expected leftImg8bit/<split>/<city>/"
                                    f"*{_IMAGE_SUFFIX})")
    if not os.path.isfile(panoptic_json):
        raise CityscapesLayoutError(f"Cityscapes panoptic json not found: {panoptic_json}; {_PREPARE}")
    if not os.path.isdir(panoptic_root):
        raise CityscapesLayoutError(f"Cityscapes panoptic PNG folder not found: {panoptic_root}; {_PREPARE}")
    try:
        with open(panoptic_json, "r", encoding="utf-8") as f:
            info = json.load(f)
        annotations = info["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CityscapesLayoutError(f"{panoptic_json}: not a readable panoptic json ({type(e).__name__}: {e})") from None
    images: Dict[str, str] = {}
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if os.path.isdir(city_dir):
            for base in os.listdir(city_dir):
                if base.endswith(_IMAGE_SUFFIX):
                    images[base[: -len(_IMAGE_SUFFIX)]] = os.path.join(city_dir, base)
    sizes = {str(im.get("id")): (im.get("height"), im.get("width")) for im in info.get("images", [])}
    things, stuff = meta["thing_dataset_id_to_contiguous_id"], meta["stuff_dataset_id_to_contiguous_id"]
    out = []
    for ann in annotations:
        image_id = str(ann["image_id"])
        image_file = images.get(image_id)
        if image_file is None:
            raise CityscapesLayoutError(f"{panoptic_json}: annotation {ann.get('file_name')} has image_id "
                                        f"{image_id!r} but {image_dir} has no {image_id}{_IMAGE_SUFFIX}")
        pan_file = os.path.join(panoptic_root, ann["file_name"])
        if not os.path.isfile(pan_file):
            raise CityscapesLayoutError(f"{pan_file} not found (listed in {panoptic_json}); {_PREPARE}")
        sem_file = _train_id_file(image_file, gt_dir)
        if not os.path.isfile(sem_file):
            raise _missing_train_ids(sem_file)
        segments = []
        for s in ann["segments_info"]:
            cat = int(s["category_id"])
            if cat in things:
                contiguous = things[cat]
            elif cat in stuff:
                contiguous = stuff[cat]
            else:
                raise CityscapesLabelError(f"{panoptic_json}: image {image_id} segment {s.get('id')} has category_id "
                                           f"{cat}, not one of the 19 Cityscapes train classes")
            segments.append({**s, "category_id": int(contiguous), "iscrowd": int(s.get("iscrowd", 0))})
        h, w = sizes.get(image_id, (None, None))
        if h is None or w is None:
            from PIL import Image

            with Image.open(image_file) as im:
                w, h = im.size
        out.append({"file_name": image_file, "image_id": image_id, "height": int(h), "width": int(w),
                    "pan_seg_file_name": pan_file, "sem_seg_file_name": sem_file, "segments_info": segments})
    return out


class _Loader:
    """Picklable, comparable ``() -> fn(*args)``."""

    def __init__(self, fn, *args: str) -> None:
        self.fn, self.args = fn, tuple(args)

    def __call__(self) -> List[dict]:
        return self.fn(*self.args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Loader) and (self.fn, self.args) == (other.fn, other.args)

    def __hash__(self) -> int:
        return hash((self.fn, self.args))

    def __repr__(self) -> str:
        return f"{self.fn.__name__}{self.args!r}"


def _abs(*paths: str) -> Tuple[str, ...]:
    return tuple(os.path.abspath(os.path.expanduser(str(p))) for p in paths)


def register_cityscapes_sem_seg(name: str, image_dir: str, gt_dir: str) -> None:
    """Register a Cityscapes split for semantic segmentation under ``name`` (loaded lazily with
    :func:`load_cityscapes_semantic`).

    Metadata: :func:`cityscapes_stuff_metadata` (19 ``stuff_classes``, ``stuff_colors``,
    ``ignore_label`` 255, the 8 ``thing_classes``), ``evaluator_type="cityscapes_sem_seg"``, ``image_dir``, ``gt_dir``.

    Raises:
        ValueError: ``name`` is already registered with other folders.
    """
    image_dir, gt_dir = _abs(image_dir, gt_dir)
    DatasetCatalog.register(name, _Loader(load_cityscapes_semantic, image_dir, gt_dir))
    MetadataCatalog.get(name).set(image_dir=image_dir, gt_dir=gt_dir, evaluator_type=SEM_SEG_EVALUATOR_TYPE,
                                  **cityscapes_stuff_metadata())


def register_cityscapes_panoptic(name: str, image_dir: str, gt_dir: str, panoptic_root: str, panoptic_json: str) -> None:
    """Register a Cityscapes split for panoptic segmentation under ``name`` (loaded lazily with
    :func:`load_cityscapes_panoptic`).

    Metadata: :func:`cityscapes_panoptic_metadata`, ``evaluator_type="cityscapes_panoptic_seg"``,
    ``panoptic_root``, ``panoptic_json``, ``gt_dir`` (``gtFine/<split>``, for the instance
    evaluator), ``image_dir`` and ``image_root`` (the same folder; Detectron2's key is ``image_root``).

    Raises:
        ValueError: ``name`` is already registered with other files.
    """
    image_dir, gt_dir, panoptic_root, panoptic_json = _abs(image_dir, gt_dir, panoptic_root, panoptic_json)
    DatasetCatalog.register(name, _Loader(load_cityscapes_panoptic, image_dir, gt_dir, panoptic_root, panoptic_json))
    MetadataCatalog.get(name).set(image_dir=image_dir, image_root=image_dir, gt_dir=gt_dir, panoptic_root=panoptic_root,
                                  panoptic_json=panoptic_json, evaluator_type=PANOPTIC_EVALUATOR_TYPE,
                                  **cityscapes_panoptic_metadata())


def panoptic_paths_of_gt_dir(gt_dir: str) -> Tuple[str, str]:
    """``(panoptic_root, panoptic_json)`` that prepare_cityscapes.py writes for ``gtFine/<split>``:
    ``gtFine/cityscapes_panoptic_<split>`` and ``gtFine/cityscapes_panoptic_<split>.json``."""
    gt_dir = os.path.abspath(os.path.expanduser(str(gt_dir))).rstrip(os.sep)
    parent, split = os.path.dirname(gt_dir), os.path.basename(gt_dir)
    return os.path.join(parent, f"cityscapes_panoptic_{split}"), os.path.join(parent, f"cityscapes_panoptic_{split}.json")


def register_all_cityscapes_seg(root: Optional[str] = None) -> None:
    """Register ``cityscapes_fine_sem_seg_{train,val}`` and ``cityscapes_fine_panoptic_{train,val}``
    under ``root`` (default ``$INSTSEG_DATASETS``); names already registered are left alone."""
    from .coco import datasets_root

    root = datasets_root() if root is None else root
    for name, (image_dir, gt_dir) in _PREDEFINED_SEM_SEG.items():
        if name not in DatasetCatalog:
            register_cityscapes_sem_seg(name, os.path.join(root, image_dir), os.path.join(root, gt_dir))
    for name, paths in _PREDEFINED_PANOPTIC.items():
        if name not in DatasetCatalog:
            register_cityscapes_panoptic(name, *(os.path.join(root, p) for p in paths))
