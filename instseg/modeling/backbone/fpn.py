"""Feature Pyramid Network on top of a :class:`Backbone` (QueryInst; FASSST's ResNet option).

Wraps :class:`torchvision.ops.FeaturePyramidNetwork` (1x1 laterals, nearest top-down, 3x3
outputs, Kaiming-uniform(a=1) init with zero bias — Detectron2's ``c2_xavier_fill``) so that it
takes our backbone dict and returns ``p2``..``p5`` (+ ``p6`` = stride-2 subsampling of ``p5``,
Detectron2's ``LastLevelMaxPool``, when ``top_block="maxpool"``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..norm import norm_layer
from ..registry import BACKBONE_REGISTRY
from .base import Backbone, ShapeSpec
from .resnet import ResNetBackbone

__all__ = ["FPN", "build_resnet_fpn_backbone"]

TOP_BLOCKS = ("", "maxpool")


class FPN(Backbone):
    """FPN over ``bottom_up``'s ``in_features``: ``res{k}`` (stride ``2**k``) -> ``p{k}``.

    Args:
        bottom_up: a backbone returning at least ``in_features``.
        in_features: names in increasing stride, e.g. ``["res2", "res3", "res4", "res5"]``.
        out_channels: channels of every output (256).
        norm: ``""`` (convs with bias), ``"GN"``, ``"BN"``, ``"SyncBN"`` or ``"FrozenBN"`` after
            each lateral and output conv.
        top_block: ``""`` or ``"maxpool"`` (adds ``p{last+1}`` = ``max_pool2d(p_last, 1, stride 2)``).

    Forward: ``(B, 3, H, W)`` -> ``{"p2": (B, 256, H/4, W/4), ..., "p5": (B, 256, H/32, W/32)}``.

    Raises:
        ValueError: a name of ``in_features`` is not produced by ``bottom_up``, strides not
            increasing, or unknown ``top_block``.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 256,
        norm: str = "",
        top_block: str = "",
    ):
        super().__init__()
        shapes = bottom_up.output_shape()
        in_features = list(in_features)
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not outputs of the backbone ({list(shapes)})")
        strides = [shapes[f].stride for f in in_features]
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f"FPN in_features must have increasing strides, got {dict(zip(in_features, strides))}")
        if top_block not in TOP_BLOCKS:
            raise ValueError(f"Unknown FPN top_block '{top_block}'; expected one of {TOP_BLOCKS}")
        self.bottom_up = bottom_up
        self.in_features = in_features
        self.fpn = FeaturePyramidNetwork(
            [shapes[f].channels for f in in_features],
            out_channels,
            extra_blocks=LastLevelMaxPool() if top_block == "maxpool" else None,
            norm_layer=norm_layer(norm),
        )
        self._shapes: Dict[str, ShapeSpec] = OrderedDict()
        for s in strides:
            self._shapes[f"p{s.bit_length() - 1}"] = ShapeSpec(out_channels, s)
        if top_block == "maxpool":
            s = strides[-1] * 2
            self._shapes[f"p{s.bit_length() - 1}"] = ShapeSpec(out_channels, s)

    @classmethod
    def from_config(cls, cfg, bottom_up: Backbone) -> "FPN":
        """``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, TOP_BLOCK}`` on ``bottom_up``."""
        f = cfg.MODEL.FPN
        return cls(bottom_up, f.IN_FEATURES, f.OUT_CHANNELS, f.NORM, f.TOP_BLOCK)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.bottom_up(x)
        out = self.fpn(OrderedDict((f, feats[f]) for f in self.in_features))
        return OrderedDict(zip(self._shapes.keys(), out.values()))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._shapes)

    @property
    def size_divisibility(self) -> int:
        return max(s.stride for s in self._shapes.values())


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_backbone(cfg) -> FPN:
    """torchvision ResNet (``MODEL.RESNETS.*``, its outputs = ``MODEL.FPN.IN_FEATURES``) + FPN."""
    bottom_up = ResNetBackbone.from_config(cfg, variant="torchvision", out_features=cfg.MODEL.FPN.IN_FEATURES)
    return FPN.from_config(cfg, bottom_up)
