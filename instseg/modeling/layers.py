"""Small layers shared by several models."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv", "coordinate_features"]


class DeformConv(nn.Module):
    """Deformable convolution (DCNv1, or DCNv2 with ``modulated=True``) that owns its offset conv.

    Wraps :func:`torchvision.ops.deform_conv2d`. ``weight``/``bias`` have the shapes of the plain
    ``nn.Conv2d`` it replaces; ``offset`` is a conv with ``2*k*k*groups`` (+ ``k*k*groups`` mask
    channels when modulated) outputs, zero-initialized so that training starts from the plain conv
    (DCNv2 paper; Detectron2 ``DeformBottleneckBlock``). With zero offsets the unmodulated layer
    equals the plain conv; the modulated one equals 0.5x it (mask = sigmoid(0)).

    Input ``(B, C_in, H, W)``; output ``(B, C_out, H', W')`` as ``nn.Conv2d`` would give.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        modulated: bool = True,
    ):
        super().__init__()
        if in_channels % groups:
            raise ValueError("in_channels must be divisible by groups")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.modulated = modulated
        self.deform_groups = deform_groups
        k2 = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.offset = nn.Conv2d(
            in_channels, (3 if modulated else 2) * k2 * deform_groups, kernel_size, stride, padding, dilation, bias=True
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:
            n = out.shape[1] // 3
            offset, mask = out[:, : 2 * n], out[:, 2 * n :].sigmoid()
        else:
            offset = out
        return deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation, mask=mask
        )


def coordinate_features(x: torch.Tensor) -> torch.Tensor:
    """Normalized absolute coordinates (CoordConv) for a ``(B, C, H, W)`` map.

    Returns ``(B, 2, H, W)`` in ``x``'s dtype: channel 0 is x, channel 1 is y, both linearly spaced
    in [-1, 1] (SparseInst Sec. 3.4 "Location-Sensitive Features"; official channel order x, y).
    """
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=torch.float32)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).to(x.dtype).expand(b, 2, h, w)
