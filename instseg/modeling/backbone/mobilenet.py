"""MobileNetV2 backbone (torchvision ``mobilenet_v2().features``), for FASSST.

The torchvision ``features`` Sequential is kept as ``self.features`` (state-dict keys
``features.0.0.weight``, ... as in torchvision's classifier checkpoint); the final 1x1 conv to
1280 channels and the classifier are dropped. Stages (width 1.0):

===========  ==================  ========  ========
name         ``features`` index  channels  stride
===========  ==================  ========  ========
stem         0-1                 16        2
``res2``     2-3                 24        4
``res3``     4-6                 32        8
``res4``     7-13                96        16
``res5``     14-17               320       32
===========  ==================  ========  ========

Channels scale with ``width_mult`` (torchvision's rounding to multiples of 8).

``extra_outputs`` (FASSST's "network head", Table 5) additionally returns the output of any
``features[i]``, ``i`` in 0..18, under a given name; ``features[18]`` (torchvision's final 1x1 conv
to 1280 channels) is built only when asked for this way.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torchvision
from torch import nn

from ..norm import NORM_NAMES, convert_norm
from ..registry import BACKBONE_REGISTRY
from .base import Backbone, ShapeSpec
from .resnet import PRETRAINED_HINT, freeze_modules

__all__ = ["MobileNetV2Backbone", "build_mobilenet_v2_backbone"]

MOBILENET_STAGES = ("res2", "res3", "res4", "res5")
# Last ``features`` index of each stage (inclusive) and its stride.
_STAGE_END = {"stem": 1, "res2": 3, "res3": 6, "res4": 13, "res5": 17}
_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# Cumulative stride after each ``features[i]``, i = 0..18 (independent of ``width_mult``).
FEATURE_STRIDES = (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 returning stride-4/8/16/32 maps as ``res2``..``res5``.

    Args:
        width_mult: torchvision's width multiplier (1.0: channels 24/32/96/320).
        norm: ``"FrozenBN"`` (default), ``"BN"``, ``"SyncBN"`` or ``"GN"`` (GN needs channels
            divisible by 32, i.e. not with width 1.0).
        out_features: names among ``res2``..``res5``; later blocks are not kept.
        freeze_at: 0 none, 1 stem, 2 stem + res2, ... (Detectron2 semantics); frozen batch norms
            become FrozenBN.
        pretrained: ImageNet weights through torchvision (``IMAGENET1K_V1``, width 1.0 only).
        extra_outputs: optional ``{name: i}``: also return the output of ``features[i]``
            (``0 <= i <= 18``; stride ``FEATURE_STRIDES[i]``) under ``name`` (not a stage name).

    Forward: ``(B, 3, H, W)`` float -> ``{name: (B, C, ceil(H/s), ceil(W/s))}``.

    Raises:
        ValueError: unknown feature / norm, ``pretrained`` with ``width_mult != 1``, or an
            ``extra_outputs`` index outside 0..18 / name clashing with a stage name.
        RuntimeError: ``pretrained`` and the weights cannot be fetched (suggests a local file).
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        norm: str = "FrozenBN",
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_at: int = 0,
        pretrained: bool = False,
        extra_outputs: Optional[Mapping[str, int]] = None,
    ):
        super().__init__()
        extra_outputs = dict(extra_outputs or {})
        for name, idx in extra_outputs.items():
            if name in MOBILENET_STAGES or name == "stem":
                raise ValueError(f"extra_outputs name '{name}' clashes with a stage name")
            if not 0 <= int(idx) < len(FEATURE_STRIDES):
                raise ValueError(f"extra_outputs index for '{name}' must be in 0..{len(FEATURE_STRIDES) - 1}, got {idx}")
        self._extra_outputs = {name: int(idx) for name, idx in extra_outputs.items()}
        out_features = list(out_features)
        if not out_features or any(f not in MOBILENET_STAGES for f in out_features):
            raise ValueError(f"MobileNetV2 out_features must be among {list(MOBILENET_STAGES)}, got {out_features}")
        if norm not in NORM_NAMES or norm == "":
            raise ValueError(f"Unknown MobileNetV2 norm '{norm}'; expected one of ['FrozenBN', 'BN', 'SyncBN', 'GN']")
        if not 0 <= int(freeze_at) <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if pretrained and float(width_mult) != 1.0:
            raise ValueError(f"torchvision has ImageNet MobileNetV2 weights for width_mult 1.0 only, got {width_mult}")
        self._out_features = [f for f in MOBILENET_STAGES if f in out_features]
        self.norm = norm
        self.freeze_at = int(freeze_at)

        try:
            model = torchvision.models.mobilenet_v2(
                weights="IMAGENET1K_V1" if pretrained else None, width_mult=float(width_mult)
            )
        except Exception as e:
            if not pretrained:
                raise
            raise RuntimeError(
                "Could not load the ImageNet weights of torchvision.models.mobilenet_v2 "
                f"(MODEL.BACKBONE.PRETRAINED True): {type(e).__name__}: {e}. Downloading needs network "
                f"access. {PRETRAINED_HINT}"
            ) from e
        last = max([_STAGE_END[f] for f in self._out_features] + list(self._extra_outputs.values()))
        features = nn.Sequential(*list(model.features.children())[: last + 1])
        self.features = convert_norm(features, norm)
        self._channels = {f: self.features[_STAGE_END[f]].out_channels for f in self._out_features}
        for name, idx in self._extra_outputs.items():
            self._channels[name] = self.features[idx].out_channels

        if self.freeze_at > 0:
            stages = self._stage_slices()
            frozen: List[nn.Module] = []
            for start, end in stages[: self.freeze_at]:
                for i in range(start, min(end, len(self.features) - 1) + 1):
                    if norm in ("BN", "SyncBN"):
                        self.features[i] = convert_norm(self.features[i], "FrozenBN")
                    frozen.append(self.features[i])
            freeze_modules(frozen)

    @staticmethod
    def _stage_slices() -> List[tuple]:
        """``(first, last)`` ``features`` indices of ``[stem, res2, res3, res4, res5]``."""
        bounds, start = [], 0
        for name in ("stem",) + MOBILENET_STAGES:
            bounds.append((start, _STAGE_END[name]))
            start = _STAGE_END[name] + 1
        return bounds

    @classmethod
    def from_config(cls, cfg) -> "MobileNetV2Backbone":
        """Build from ``MODEL.MOBILENET.{WIDTH_MULT, NORM, OUT_FEATURES}`` and
        ``MODEL.BACKBONE.{FREEZE_AT, PRETRAINED}``."""
        m = cfg.MODEL.MOBILENET
        return cls(
            width_mult=m.WIDTH_MULT,
            norm=m.NORM,
            out_features=list(m.OUT_FEATURES),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            pretrained=cfg.MODEL.BACKBONE.PRETRAINED,
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{"res3": (B, 32, H/8, W/8), "res4": (B, 96, H/16, W/16),
        "res5": (B, 320, H/32, W/32)}`` (width 1.0; only the requested names)."""
        ends: Dict[int, List[str]] = {}
        for f in self._out_features:
            ends.setdefault(_STAGE_END[f], []).append(f)
        for name, idx in self._extra_outputs.items():
            ends.setdefault(idx, []).append(name)
        outputs: Dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.features):
            x = block(x)
            for name in ends.get(i, ()):
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = {f: ShapeSpec(channels=self._channels[f], stride=_STRIDES[f]) for f in self._out_features}
        for name, idx in self._extra_outputs.items():
            shapes[name] = ShapeSpec(channels=self._channels[name], stride=FEATURE_STRIDES[idx])
        return shapes

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg) -> MobileNetV2Backbone:
    """MobileNetV2 from ``MODEL.MOBILENET.*`` (FASSST)."""
    return MobileNetV2Backbone.from_config(cfg)
