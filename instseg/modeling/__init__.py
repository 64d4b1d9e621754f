from .build import build_model
from .meta_arch import MetaArchBase, collect_targets, pad_to_divisible
from .postprocessing import (
    binarize,
    boxes_from_masks,
    dense_masks_to_instances,
    masks_to_original,
    paste_masks_in_boxes,
    roi_masks_to_instances,
    select_top,
)
from .registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY

__all__ = [
    "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY",
    "MetaArchBase",
    "binarize",
    "collect_targets",
    "dense_masks_to_instances",
    "paste_masks_in_boxes",
    "roi_masks_to_instances",
    "select_top",
    "boxes_from_masks",
    "build_model",
    "masks_to_original",
    "pad_to_divisible",
]
