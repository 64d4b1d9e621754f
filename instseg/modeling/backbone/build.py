"""``build_backbone(cfg)``: the backbone named by ``MODEL.BACKBONE.NAME``."""
from __future__ import annotations

from ..registry import BACKBONE_REGISTRY
from .base import Backbone

__all__ = ["build_backbone"]


def build_backbone(cfg) -> Backbone:
    """Build ``cfg.MODEL.BACKBONE.NAME`` from :data:`BACKBONE_REGISTRY` (``fn(cfg) -> Backbone``).

    Registered here: ``build_resnet_backbone``, ``build_resnet_vd_backbone``,
    ``build_mobilenet_v2_backbone``, ``build_resnet_fpn_backbone``.

    Raises:
        KeyError: the name is not registered (the message lists the registered ones).
        TypeError: the registered function did not return a :class:`Backbone`.
        RuntimeError: ``MODEL.BACKBONE.PRETRAINED`` and the weights cannot be downloaded.
    """
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONE_REGISTRY:
        known = sorted(k for k, _ in BACKBONE_REGISTRY)
        raise KeyError(f"MODEL.BACKBONE.NAME '{name}' is not registered; known: {known}")
    backbone = BACKBONE_REGISTRY.get(name)(cfg)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"Backbone builder '{name}' returned {type(backbone).__name__}, not a Backbone")
    return backbone
