"""Backbones (registered in :data:`instseg.modeling.BACKBONE_REGISTRY` on import)."""
from .base import Backbone, ShapeSpec
from .build import build_backbone
from .fpn import FPN, build_resnet_fpn_backbone
from .mobilenet import MobileNetV2Backbone, build_mobilenet_v2_backbone
from .resnet import DeformConv, ResNetBackbone, build_resnet_backbone, build_resnet_vd_backbone

__all__ = [
    "Backbone",
    "DeformConv",
    "FPN",
    "MobileNetV2Backbone",
    "ResNetBackbone",
    "ShapeSpec",
    "build_backbone",
    "build_mobilenet_v2_backbone",
    "build_resnet_backbone",
    "build_resnet_fpn_backbone",
    "build_resnet_vd_backbone",
]
