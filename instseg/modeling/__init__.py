from .build import build_model
from .meta_arch import MetaArchBase, boxes_from_masks, masks_to_original, pad_to_divisible
from .registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY

__all__ = [
    "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY",
    "MetaArchBase",
    "boxes_from_masks",
    "build_model",
    "masks_to_original",
    "pad_to_divisible",
]
