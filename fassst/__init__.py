"""FASSST (WACV 2022) on the shared instseg core. Importing registers the meta-architecture
``FASSST``, the backbone ``build_fassst_mobilenet_v2_backbone`` and the ``MODEL.FASSST`` config
keys. No official code exists; docs/fassst.md lists our reading of the paper."""
from .config import add_fassst_config
from .criterion import FASSSTCriterion
from .fassst import FASSST
from .instance_attention import InstanceAttentionModule
from .mask_tail import MaskTail
from .network_head import build_fassst_mobilenet_v2_backbone
from .rff import PyramidMaskLayers, RoIFeatureFusion, fuse_roi_features

__all__ = [
    "FASSST",
    "FASSSTCriterion",
    "InstanceAttentionModule",
    "MaskTail",
    "PyramidMaskLayers",
    "RoIFeatureFusion",
    "add_fassst_config",
    "build_fassst_mobilenet_v2_backbone",
    "fuse_roi_features",
]
