"""Pyramid pooling module (PSPNet, Zhao et al. 2017) as used on C5/P5 by SparseInst's instance
context encoder (Sec. 3.2) and FastInst's PPM-FPN pixel decoder.

Structure from the official code (docs/sparseinst.md): per bin size an adaptive average pool, a 1x1 conv
(with bias, no norm) to ``channels`` and ReLU, bilinearly upsampled back; the input and the
branches are concatenated (branches first, then the input, as in the official code) and reduced by a 1x1 conv (with bias) + ReLU. State-dict keys match the
official ``ppm.stages.<i>.1`` / ``ppm.bottleneck`` names.

Initialization: none of its own. Both official PPMs (``PyramidPoolingModule`` in hustvl/SparseInst
``sparseinst/encoder.py`` and in junjiehe96/FastInst
``fastinst/modeling/pixel_decoder/fastinst_encoder.py``) build the branch convs and the bottleneck
as plain Detectron2 ``Conv2d`` (an ``nn.Conv2d``) and never re-initialize them, while the encoders
around them fill their own convs (``c2_xavier_fill`` / ``c2_msra_fill``). So every conv here keeps
PyTorch's default: weights kaiming-uniform with ``a=sqrt(5)`` (std ``1/sqrt(3 fan_in)``, about
0.036 for the 256-channel branches and 0.026 for the 512-channel bottleneck input) and biases
uniform in ``+-1/sqrt(fan_in)``; ``c2_msra_fill`` would give std ``sqrt(2/fan_out)`` (0.18 and 0.09)
and zero biases.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PyramidPoolingModule"]


class PyramidPoolingModule(nn.Module):
    """``(B, C, H, W) -> (B, out_channels, H, W)``.

    Args:
        in_channels: C.
        out_channels: channels after the bottleneck (default: C).
        channels: channels of each pooled branch (64 in both official codes).
        sizes: output bins of the adaptive pools (1, 2, 3, 6).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, channels: int = 64, sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        out_channels = out_channels or in_channels
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True)) for s in sizes
        )
        # PyTorch's default init, as in both official codes (module docstring)
        self.bottleneck = nn.Conv2d(in_channels + len(sizes) * channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        priors = [F.interpolate(stage(x), size=(h, w), mode="bilinear", align_corners=False) for stage in self.stages]
        return F.relu(self.bottleneck(torch.cat(priors + [x], dim=1)))
