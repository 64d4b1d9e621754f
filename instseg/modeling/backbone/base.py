"""Backbone interface shared by all models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

__all__ = ["Backbone", "ShapeSpec"]


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (pixels of input per feature pixel) of one feature map."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """A backbone maps ``(B, 3, H, W)`` float images to a dict of named feature maps.

    ``output_shape()`` gives each returned name's :class:`ShapeSpec` (e.g. ``res3``: 512 channels,
    stride 8 for ResNet-50).
    """

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def output_shape(self) -> Dict[str, ShapeSpec]:  # pragma: no cover - interface
        raise NotImplementedError
