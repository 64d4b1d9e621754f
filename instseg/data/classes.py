"""``MODEL.NUM_CLASSES`` resolution from the datasets' ``thing_classes`` (semantic / panoptic
datasets: ``stuff_classes``)."""
from __future__ import annotations

import logging
from typing import Sequence

from .catalog import DatasetCatalog, MetadataCatalog

__all__ = ["resolve_num_classes"]

logger = logging.getLogger(__name__)


#: ``evaluator_type`` values of the semantic / panoptic datasets, whose classes are ``stuff_classes``
#: (Cityscapes: the 19 train classes; COCO panoptic: all 133 categories).
SEGMENTATION_EVALUATOR_TYPES = ("sem_seg", "cityscapes_sem_seg", "cityscapes_panoptic_seg", "coco_panoptic_seg")


def _class_key(meta) -> str:
    """``"stuff_classes"`` for a semantic / panoptic dataset that has them, else ``"thing_classes"``."""
    if meta.has("stuff_classes") and meta.get("evaluator_type") in SEGMENTATION_EVALUATOR_TYPES:
        return "stuff_classes"
    return "thing_classes"


def _classes_of(name: str):
    if name not in DatasetCatalog:
        raise KeyError(
            f"Dataset {name!r} is not registered. Registered datasets: {', '.join(DatasetCatalog.list())}"
        )
    meta = MetadataCatalog.get(name)
    key = _class_key(meta)
    if not meta.has(key):
        DatasetCatalog.get(name)  # a COCO loader sets the metadata
        key = _class_key(meta)
    classes = meta.get(key)
    if classes is None:
        raise ValueError(
            f"Dataset {name!r} has no 'thing_classes' in its metadata: cannot infer the number of "
            "classes; set MODEL.NUM_CLASSES"
        )
    return classes


def _num_classes_of(name: str) -> int:
    return len(_classes_of(name))


def _check_same_classes(names: Sequence[str]) -> None:
    """All datasets must have the same number of classes (different names only warn)."""
    if len(names) < 2:
        return
    counts = {n: _num_classes_of(n) for n in names}
    if len(set(counts.values())) > 1:
        raise ValueError(
            "The training datasets have different numbers of classes: "
            + ", ".join(f"{n!r}: {c}" for n, c in counts.items())
        )
    first = list(_classes_of(names[0]))
    for n in names[1:]:
        if list(_classes_of(n)) != first:
            logger.warning("Datasets %r and %r have different class names", names[0], n)


def resolve_num_classes(cfg) -> int:
    """Check or fill ``MODEL.NUM_CLASSES`` from the datasets' ``thing_classes`` (for a dataset
    whose ``evaluator_type`` is semantic or panoptic, :data:`SEGMENTATION_EVALUATOR_TYPES`, and
    that has ``stuff_classes``: ``len(stuff_classes)``, e.g. 19 for Cityscapes, 133 for COCO panoptic).

    The reference dataset is the first of ``DATASETS.TRAIN`` (else of ``DATASETS.TEST``); all
    training datasets must have the same number of classes. ``MODEL.NUM_CLASSES == -1`` is set
    to that number (a frozen cfg is defrosted and frozen again).

    Returns:
        The number of classes.

    Raises:
        ValueError: ``MODEL.NUM_CLASSES`` differs from the dataset's number (the message names
            both numbers and the dataset); the training datasets disagree, or a test dataset
            whose classes are known has another number; no dataset is given and
            ``MODEL.NUM_CLASSES`` is -1; a dataset has no ``thing_classes``.
        KeyError: a dataset is not registered.
    """
    n_cfg = int(cfg.MODEL.NUM_CLASSES)
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        if n_cfg <= 0:
            raise ValueError(
                f"MODEL.NUM_CLASSES is {n_cfg} and no dataset is given (DATASETS.TRAIN and "
                "DATASETS.TEST are empty): set MODEL.NUM_CLASSES"
            )
        return n_cfg
    if cfg.DATASETS.TRAIN:
        _check_same_classes(list(cfg.DATASETS.TRAIN))
    ref = names[0]
    n_data = _num_classes_of(ref)
    if cfg.DATASETS.TRAIN:
        # Evaluation datasets must share the class space (checked when their classes are known
        # without loading them).
        for name in cfg.DATASETS.TEST:
            meta = MetadataCatalog.get(name)
            if name not in DatasetCatalog or not meta.has(_class_key(meta)):
                continue
            try:
                n_test = len(meta.get(_class_key(meta)))
            except FileNotFoundError:
                continue
            if n_test != n_data:
                raise ValueError(
                    f"Test dataset {name!r} has {n_test} classes but training dataset {ref!r} "
                    f"has {n_data}"
                )
    if n_cfg == -1:
        frozen = cfg.is_frozen()
        if frozen:
            cfg.defrost()
        cfg.MODEL.NUM_CLASSES = n_data
        if frozen:
            cfg.freeze()
        logger.info("MODEL.NUM_CLASSES set to %d from dataset %r", n_data, ref)
    elif n_cfg != n_data:
        raise ValueError(
            f"MODEL.NUM_CLASSES is {n_cfg} but dataset {ref!r} has {n_data} classes; set "
            f"MODEL.NUM_CLASSES {n_data} (or -1 to take it from the dataset)"
        )
    return n_data
