"""Datasets (catalog, COCO json, synthetic smoke set), the mapper, augmentations and loaders.

Importing this package registers the built-in names (cheap, nothing is read or generated):

- ``coco_2017_train`` / ``coco_2017_val`` under ``$INSTSEG_DATASETS`` (default ``./datasets``),
  standard layout ``coco/annotations/instances_{train,val}2017.json``, ``coco/{train,val}2017/``;
- ``smoke_shapes_train`` / ``smoke_shapes_val``: the synthetic smoke-test dataset, generated
  under ``$INSTSEG_DATASETS/smoke_shapes`` on first use.
- ``cityscapes_fine_instance_seg_train`` / ``_val`` / ``_test`` under
  ``$INSTSEG_DATASETS/cityscapes/{leftImg8bit,gtFine}/<split>/<city>/`` (Detectron2's names;
  ``cityscapes`` module, evaluated with cityscapesscripts).
- ``cityscapes_fine_sem_seg_{train,val}`` and ``cityscapes_fine_panoptic_{train,val}`` (same
  root; the files ``datasets/prepare_cityscapes.py`` writes; ``cityscapes_seg`` module) and
  ``coco_2017_{train,val}_panoptic`` (``coco/panoptic_{train,val}2017{.json,/}``;
  ``coco_panoptic`` module), all with Detectron2's names and layouts.

Modules: ``catalog`` (registries), ``coco`` (COCO json), ``cityscapes`` (Cityscapes layout),
``smoke`` (synthetic set), ``mapper``, ``seg_mapper`` (semantic / panoptic mappers, :func:`build_mapper`),
``transforms`` and ``polygons`` (one dict -> model input), ``dataset`` (dataset dicts, :class:`MapDataset`),
``samplers``, ``build`` (the loaders), ``classes`` (``MODEL.NUM_CLASSES`` resolution),
``validation`` (annotation and image-file checks, the dataset error classes, the up-front file
scan :func:`check_dataset_files`).

See ``datasets/README.md`` for the layout and for custom COCO-format data.
"""
from .build import build_test_loader, build_train_loader, trivial_batch_collator
from .catalog import DatasetCatalog, Metadata, MetadataCatalog
from .classes import resolve_num_classes
from .cityscapes import (
    CityscapesLabelError,
    CityscapesLayoutError,
    cityscapes_instance_metadata,
    load_cityscapes_instances,
    register_all_cityscapes,
    register_cityscapes_instances,
)
from .cityscapes_seg import (
    cityscapes_panoptic_metadata,
    cityscapes_stuff_metadata,
    load_cityscapes_panoptic,
    load_cityscapes_semantic,
    register_all_cityscapes_seg,
    register_cityscapes_panoptic,
    register_cityscapes_sem_seg,
)
from .coco import (
    COCO_CATEGORIES,
    datasets_root,
    load_coco_json,
    read_coco_categories,
    register_all_coco,
    register_coco_instances,
)
from .coco_panoptic import load_coco_panoptic_json, register_all_coco_panoptic, register_coco_panoptic
from .dataset import MapDataset, get_dataset_dicts
from .mapper import DatasetMapper, annotations_to_masks, read_image
from .polygons import Polygons, clip_polygons_to_margin, coordinate_margin, polygons_to_bitmask
from .seg_mapper import PanopticDatasetMapper, SemanticDatasetMapper, build_mapper, rgb2id
from .samplers import GroupedBatchSampler, InferenceSampler, InfiniteBatchSampler, TrainingSampler
from .smoke import SMOKE_CLASSES, ensure_smoke_dataset, make_smoke_dataset, register_smoke_dataset
from .transforms import RandomCrop, ResizeShortestEdge, boxes_from_masks, build_augmentation
from .validation import (
    AnnotationError,
    DatasetError,
    DatasetFilesError,
    DatasetJSONError,
    ImageDecodeError,
    check_dataset_files,
)

__all__ = [
    "DatasetCatalog",
    "MetadataCatalog",
    "Metadata",
    "load_coco_json",
    "read_coco_categories",
    "register_coco_instances",
    "register_all_coco",
    "load_cityscapes_instances",
    "register_cityscapes_instances",
    "register_all_cityscapes",
    "cityscapes_instance_metadata",
    "load_cityscapes_semantic",
    "load_cityscapes_panoptic",
    "register_cityscapes_sem_seg",
    "register_cityscapes_panoptic",
    "register_all_cityscapes_seg",
    "cityscapes_stuff_metadata",
    "cityscapes_panoptic_metadata",
    "load_coco_panoptic_json",
    "register_coco_panoptic",
    "register_all_coco_panoptic",
    "SemanticDatasetMapper",
    "PanopticDatasetMapper",
    "build_mapper",
    "rgb2id",
    "CityscapesLayoutError",
    "CityscapesLabelError",
    "datasets_root",
    "COCO_CATEGORIES",
    "DatasetMapper",
    "ImageDecodeError",
    "DatasetError",
    "DatasetJSONError",
    "AnnotationError",
    "DatasetFilesError",
    "check_dataset_files",
    "read_image",
    "annotations_to_masks",
    "Polygons",
    "polygons_to_bitmask",
    "coordinate_margin",
    "clip_polygons_to_margin",
    "ResizeShortestEdge",
    "RandomCrop",
    "build_augmentation",
    "boxes_from_masks",
    "TrainingSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "InfiniteBatchSampler",
    "MapDataset",
    "get_dataset_dicts",
    "build_train_loader",
    "build_test_loader",
    "resolve_num_classes",
    "trivial_batch_collator",
    "SMOKE_CLASSES",
    "make_smoke_dataset",
    "ensure_smoke_dataset",
    "register_smoke_dataset",
]

register_all_coco()
register_all_cityscapes()
register_all_cityscapes_seg()
register_all_coco_panoptic()
register_smoke_dataset()
