"""Cityscapes instance segmentation in the layout it is downloaded in (Detectron2's dataset names).

Layout (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` unpacked side by side)::

    $INSTSEG_DATASETS/cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    $INSTSEG_DATASETS/cityscapes/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
                                                                 ..._gtFine_instanceIds.png (, _labelIds.png)

Built-in names (registered when :mod:`instseg.data` is imported; nothing is read until used):
``cityscapes_fine_instance_seg_train`` / ``_val`` / ``_test``, as in Detectron2.

Classes: the 8 Cityscapes labels with ``hasInstances`` and not ``ignoreInEval`` in
cityscapesscripts' ``labels.py``, in its order, as contiguous ids 0..7: person, rider, car, truck,
bus, train, motorcycle, bicycle (``caravan`` and ``trailer`` are void in the evaluation and are
not loaded, as in Detectron2).

**Annotation source.** ``from_json=False`` (the default) reads the instances from the
``_gtFine_instanceIds.png`` files: they are the ground truth that cityscapesscripts' evaluation
scores against, so the training masks are exactly the evaluated regions, whatever the Pillow
version. ``from_json=True`` (Detectron2's default) draws them from the ``_gtFine_polygons.json``
files with cityscapesscripts' own ``json2instanceImg.createInstanceImage`` (polygons in file order,
a later object occluding the earlier ones) and checks every label name; that drawing depends on
the rasterizer: on ``cityscapes-sample`` it differs from the shipped PNGs by a few boundary pixels
in most instances (Pillow 13; docs/cityscapes.md). Detectron2 instead dilates the polygons by
0.5 px and resolves overlaps with shapely, another approximation. Either way each instance is
stored as a compressed RLE mask of exactly its pixels (Detectron2's ``to_polygons=False``
format), which the mapper transforms as a mask.

Dataset dict (one per image; docs/architecture.md "Data contract")::

    {"file_name": str (absolute path of the _leftImg8bit.png), "image_id": str (its basename, as
     Detectron2), "height": int, "width": int, "gt_file": str (absolute path of the
     _gtFine_instanceIds.png, used by the evaluator),
     "annotations": [{"id": int (the instanceIds.png value: labelId * 1000 + k, or the labelId of
                      a group), "category_id": int (0..7), "bbox": [x, y, w, h] (pixels, tight),
                      "bbox_mode": "XYWH_ABS", "segmentation": RLE dict (``counts`` str),
                      "iscrowd": 0 | 1 (1 for "<label>group" regions)}, ...]}
"""
from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .catalog import DatasetCatalog, MetadataCatalog

__all__ = [
    "CityscapesLayoutError",
    "CityscapesLabelError",
    "cityscapes_instance_metadata",
    "load_cityscapes_instances",
    "cityscapes_files_to_dict",
    "register_cityscapes_instances",
    "register_all_cityscapes",
]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIX = "_leftImg8bit.png"
_JSON_SUFFIX = "_gtFine_polygons.json"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"

#: Built-in names -> (image folder, gt folder) under the datasets root (Detectron2's names).
_PREDEFINED_CITYSCAPES = {
    "cityscapes_fine_instance_seg_train": ("cityscapes/leftImg8bit/train", "cityscapes/gtFine/train"),
    "cityscapes_fine_instance_seg_val": ("cityscapes/leftImg8bit/val", "cityscapes/gtFine/val"),
    "cityscapes_fine_instance_seg_test": ("cityscapes/leftImg8bit/test", "cityscapes/gtFine/test"),
}

#: ``MetadataCatalog`` ``evaluator_type`` of these datasets (Detectron2's value).
EVALUATOR_TYPE = "cityscapes_instance"


class CityscapesLayoutError(ValueError):
    """The folders are not in the Cityscapes layout (the message names the folder or file)."""


class CityscapesLabelError(ValueError):
    """A ``_gtFine_polygons.json`` or ``_gtFine_instanceIds.png`` has a label that cityscapesscripts'
    ``labels.py`` does not know (the message names the file and the label)."""


def _instance_labels():
    from cityscapesscripts.helpers.labels import labels

    return [lab for lab in labels if lab.hasInstances and not lab.ignoreInEval]


def cityscapes_instance_metadata() -> Dict[str, Any]:
    """The class metadata of the Cityscapes instance task, from cityscapesscripts' ``labels.py``.

    Returns:
        ``{"thing_classes": list[str] (8 names, contiguous id = index), "thing_colors":
        list[tuple[int, int, int]] (RGB, the labels' colors), "thing_dataset_id_to_contiguous_id":
        dict[int, int] (Cityscapes labelId, e.g. 24 for person, -> 0..7)}``.
    """
    labs = _instance_labels()
    return {
        "thing_classes": [lab.name for lab in labs],
        "thing_colors": [tuple(int(c) for c in lab.color) for lab in labs],
        "thing_dataset_id_to_contiguous_id": {int(lab.id): i for i, lab in enumerate(labs)},
    }


def _list_files(image_dir: str, gt_dir: str, from_json: bool) -> List[Tuple[str, str, str]]:
    """``[(image_file, gt_instance_png, gt_json), ...]`` sorted by path, the layout checked."""
    if not os.path.isdir(image_dir):
        raise CityscapesLayoutError(
            f"Cityscapes image folder not found: {image_dir} (expected leftImg8bit/<split>/<city>/"
            f"*{_IMAGE_SUFFIX}; see datasets/README.md)")
    if not os.path.isdir(gt_dir):
        raise CityscapesLayoutError(
            f"Cityscapes ground-truth folder not found: {gt_dir} (expected gtFine/<split>/<city>/"
            f"*{_JSON_SUFFIX} and *{_INSTANCE_SUFFIX}; see datasets/README.md)")
    cities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    if not cities:
        loose = sorted(glob.glob(os.path.join(image_dir, "*" + _IMAGE_SUFFIX)))
        hint = f" ({len(loose)} *{_IMAGE_SUFFIX} files lie directly in it)" if loose else ""
        raise CityscapesLayoutError(
            f"{image_dir}: no city folders{hint}; the Cityscapes layout is "
            f"leftImg8bit/<split>/<city>/<city>_<seq>_<frame>{_IMAGE_SUFFIX}")
    files = []
    for city in cities:
        city_dir = os.path.join(image_dir, city)
        images = sorted(glob.glob(os.path.join(city_dir, "*" + _IMAGE_SUFFIX)))
        if not images:
            raise CityscapesLayoutError(f"{city_dir}: city folder without *{_IMAGE_SUFFIX} images")
        gt_city = os.path.join(gt_dir, city)
        if not os.path.isdir(gt_city):
            raise CityscapesLayoutError(
                f"{gt_city}: ground-truth folder of city {city!r} not found (the images are in {city_dir})")
        for image_file in images:
            stem = os.path.basename(image_file)[: -len(_IMAGE_SUFFIX)]
            inst = os.path.join(gt_city, stem + _INSTANCE_SUFFIX)
            js = os.path.join(gt_city, stem + _JSON_SUFFIX)
            needed = [js] if from_json else [inst]
            missing = [p for p in needed if not os.path.isfile(p)]
            if missing:
                raise CityscapesLayoutError(
                    f"{gt_city}: image {os.path.basename(image_file)} has no gtFine file "
                    f"{os.path.basename(missing[0])} (from_json={from_json})")
            files.append((image_file, inst, js))
    return files


def _instance_image_from_json(json_file: str) -> Tuple[np.ndarray, int, int]:
    """The instance-id image cityscapesscripts draws from a polygons json (``json2instanceImg``)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    try:
        with open(json_file, "r", encoding="utf-8") as f:
            text = f.read()
        obj = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CityscapesLayoutError(f"{json_file}: cannot read the polygons json ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list):
        raise CityscapesLayoutError(f"{json_file}: not a Cityscapes polygons json (no 'objects' list)")
    for key in ("imgHeight", "imgWidth"):
        v = obj.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CityscapesLayoutError(f"{json_file}: '{key}' must be a positive integer, got {v!r}")
    for i, o in enumerate(obj["objects"]):
        if not isinstance(o, dict) or not isinstance(o.get("label"), str) or not isinstance(o.get("polygon"), list):
            raise CityscapesLayoutError(f"{json_file}: object #{i} must have a 'label' string and a 'polygon' list")
        if o.get("deleted"):
            continue
        name = o["label"]
        if name not in name2label and not (name.endswith("group") and name[: -len("group")] in name2label):
            raise CityscapesLabelError(
                f"{json_file}: object #{i} has the unknown label {name!r} (not in cityscapesscripts' "
                "labels.py, nor '<label>group')")
    annotation = Annotation()
    annotation.fromJsonText(text)
    img = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int32)
    return img, int(obj["imgHeight"]), int(obj["imgWidth"])


def cityscapes_files_to_dict(files: Tuple[str, str, str], from_json: bool = False) -> Dict[str, Any]:
    """One image's dataset dict (module docstring) from its files.

    Args:
        files: ``(image_file, instance_ids_png, polygons_json)``.
        from_json: draw the instances from the json, or read the instance PNG (default).

    Raises:
        CityscapesLabelError: an unknown label name (json) or label id (PNG), file named.
        CityscapesLayoutError: an unreadable or malformed json / PNG, file named.
    """
    from cityscapesscripts.helpers.labels import id2label
    from pycocotools import mask as mask_util
    from PIL import Image

    image_file, inst_file, json_file = files
    if from_json:
        inst, height, width = _instance_image_from_json(json_file)
        source = json_file
    else:
        try:
            with Image.open(inst_file) as im:
                inst = np.asarray(im, dtype=np.int32)
        except OSError as e:
            raise CityscapesLayoutError(f"{inst_file}: cannot read the instance-id PNG ({e})") from None
        if inst.ndim != 2:
            raise CityscapesLayoutError(f"{inst_file}: instance-id PNG must be single-channel, got shape {inst.shape}")
        height, width = inst.shape
        source = inst_file
    contiguous = cityscapes_instance_metadata()["thing_dataset_id_to_contiguous_id"]
    annotations = []
    for value in np.unique(inst):
        value = int(value)
        label_id = value // 1000 if value >= 1000 else value
        label = id2label.get(label_id)
        if label is None:
            raise CityscapesLabelError(f"{source}: pixel value {value} has the unknown label id {label_id}")
        if label_id not in contiguous:
            continue
        mask = np.asfortranarray(inst == value, dtype=np.uint8)
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({
            "id": value,
            "category_id": contiguous[label_id],
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "bbox_mode": "XYWH_ABS",
            "segmentation": rle,
            "iscrowd": int(value < 1000),
        })
    return {
        "file_name": image_file,
        "image_id": os.path.basename(image_file),
        "height": int(height),
        "width": int(width),
        "gt_file": inst_file,
        "annotations": annotations,
    }


def _default_workers() -> int:
    try:
        from instseg.utils import comm

        world = max(comm.get_world_size(), 1)
    except Exception:  # pragma: no cover - comm always imports
        world = 1
    return max(1, min(16, (os.cpu_count() or 1) // world))


def load_cityscapes_instances(image_dir: str, gt_dir: str, from_json: bool = False,
                              num_workers: Optional[int] = None) -> List[Dict[str, Any]]:
    """Load one Cityscapes split into dataset dicts (module docstring), the files in parallel.

    Args:
        image_dir: e.g. ``cityscapes/leftImg8bit/train`` (holds one folder per city).
        gt_dir: e.g. ``cityscapes/gtFine/train`` (same city folders).
        from_json: instances from ``_gtFine_polygons.json`` (drawn as cityscapesscripts draws
            them, label names checked) instead of ``_gtFine_instanceIds.png`` (the default).
        num_workers: processes of the pool (default: CPU cores / DDP world size, at most 16);
            ``0`` or ``1`` loads in this process. The pool is only started for more files than
            workers.

    Returns:
        One dict per image, sorted by city and file name; images without instances are kept
        (the training loader filters them).

    Raises:
        CityscapesLayoutError: a folder missing, no city folders, a city folder without images,
            an image without its gtFine file(s), or a malformed file (the folder / file named).
        CityscapesLabelError: an unknown label (the file named).
    """
    image_dir = os.path.abspath(os.path.expanduser(str(image_dir)))
    gt_dir = os.path.abspath(os.path.expanduser(str(gt_dir)))
    files = _list_files(image_dir, gt_dir, from_json)
    workers = _default_workers() if num_workers is None else int(num_workers)
    if workers > 1 and len(files) > workers:
        # fork (Linux): the workers need no re-import; elsewhere the platform default.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        chunk = max(1, len(files) // (workers * 4))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            dicts = list(pool.map(cityscapes_files_to_dict, files, [from_json] * len(files), chunksize=chunk))
    else:
        dicts = [cityscapes_files_to_dict(f, from_json) for f in files]
    n_inst = sum(len(d["annotations"]) for d in dicts)
    logger.info("Loaded %d images with %d instances from %s (%s)", len(dicts), n_inst, image_dir,
                "polygons json" if from_json else "instanceIds.png")
    return dicts


class _CityscapesLoader:
    """Picklable, comparable ``() -> load_cityscapes_instances(image_dir, gt_dir, from_json)``."""

    def __init__(self, image_dir: str, gt_dir: str, from_json: bool) -> None:
        self.image_dir, self.gt_dir, self.from_json = image_dir, gt_dir, bool(from_json)

    def _key(self):
        return (self.image_dir, self.gt_dir, self.from_json)

    def __call__(self) -> List[dict]:
        return load_cityscapes_instances(self.image_dir, self.gt_dir, self.from_json)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CityscapesLoader) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"load_cityscapes_instances({self.image_dir!r}, {self.gt_dir!r}, from_json={self.from_json})"


def register_cityscapes_instances(name: str, image_dir: str, gt_dir: str, from_json: bool = False,
                                  metadata: Optional[Dict[str, Any]] = None) -> None:
    """Register a folder pair in Cityscapes layout under ``name`` (loaded lazily, on first use).

    ``MetadataCatalog.get(name)`` gets ``image_dir``, ``gt_dir`` (absolute paths),
    ``evaluator_type="cityscapes_instance"`` (so ``DATASETS.TEST`` alone selects
    :class:`instseg.evaluation.CityscapesInstanceEvaluator`), and ``thing_classes``,
    ``thing_colors``, ``thing_dataset_id_to_contiguous_id`` (:func:`cityscapes_instance_metadata`).
    Registering the same name again with the same folders is a no-op.

    Raises:
        ValueError: ``name`` is already registered with another loader.
    """
    image_dir = os.path.abspath(os.path.expanduser(str(image_dir)))
    gt_dir = os.path.abspath(os.path.expanduser(str(gt_dir)))
    DatasetCatalog.register(name, _CityscapesLoader(image_dir, gt_dir, from_json))
    MetadataCatalog.get(name).set(image_dir=image_dir, gt_dir=gt_dir, evaluator_type=EVALUATOR_TYPE,
                                  **cityscapes_instance_metadata(), **(metadata or {}))


def register_all_cityscapes(root: Optional[str] = None) -> None:
    """Register ``cityscapes_fine_instance_seg_{train,val,test}`` under ``root`` (default
    ``$INSTSEG_DATASETS``, see :func:`instseg.data.datasets_root`); names already registered are
    left as they are."""
    from .coco import datasets_root

    root = datasets_root() if root is None else root
    for name, (image_dir, gt_dir) in _PREDEFINED_CITYSCAPES.items():
        if name in DatasetCatalog:
            continue
        register_cityscapes_instances(name, os.path.join(root, image_dir), os.path.join(root, gt_dir))
