"""Small layers shared by several models."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from .norm import get_norm

__all__ = ["DeformConv", "conv_norm_relu_stack", "coordinate_features"]


class DeformConv(nn.Module):
    """Deformable 3x3 convolution (DCNv1, or DCNv2 when ``modulated``) owning its offset conv.

    ``offset`` is an ``nn.Conv2d(in_channels, deformable_groups * (27 if modulated else 18), k,
    stride, padding, dilation, bias=True)`` initialized to zero, so a fresh layer samples the
    regular grid. Modulated: like Detectron2's ``ModulatedDeformBottleneckBlock``, the offset
    conv's output is chunked in three along channels, the first two chunks are the offsets and the
    mask is ``sigmoid`` of the last third (so a fresh modulated layer gives 0.5 x the plain conv).

    Computed by :func:`torchvision.ops.deform_conv2d` (CPU and CUDA, no compiled extension).

    Shapes: input ``(B, in_channels, H, W)`` float -> ``(B, out_channels, H', W')`` with the usual
    convolution output size.
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
        deformable_groups: int = 1,
        modulated: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deformable_groups, self.modulated = groups, deformable_groups, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=1)
        per_point = 3 if modulated else 2
        self.offset = nn.Conv2d(
            in_channels,
            deformable_groups * per_point * k * k,
            kernel_size=k,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, modulated: bool = True, deformable_groups: int = 1) -> "DeformConv":
        """A DeformConv with ``conv``'s geometry and a copy of its weight (and bias)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size[0],
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            deformable_groups=deformable_groups,
            modulated=modulated,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.offset(x)
        mask = None
        if self.modulated:
            off_x, off_y, mask = torch.chunk(out, 3, dim=1)
            offset = torch.cat((off_x, off_y), dim=1)
            mask = mask.sigmoid()
        else:
            offset = out
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, deformable_groups={self.deformable_groups}, "
            f"modulated={self.modulated}, bias={self.bias is not None}"
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


def conv_norm_relu_stack(
    num_convs: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    norm: Union[str, Callable[[int], nn.Module], None] = "",
    bias: Optional[bool] = None,
    last_relu: bool = True,
    conv_layer: Optional[Callable[[int, int, int], nn.Module]] = None,
) -> nn.Sequential:
    """``num_convs`` x (``k x k`` conv, optional norm, ReLU) as one flat :class:`nn.Sequential`.

    The layers are appended in that order, so the state-dict keys are the Sequential's indices:
    with a norm, conv ``i`` is ``3i`` and its norm ``3i + 1``; without one, conv ``i`` is ``2i``
    (the ReLUs have no parameters). A stack of one conv is the usual ``[conv, norm, ReLU]`` block.

    Args:
        num_convs: number of convs (>= 0; 0 gives an empty Sequential, the identity).
        in_channels: channels of the first conv's input; the others take ``out_channels``.
        out_channels: channels of every conv's output.
        kernel_size: of the default conv (padding ``kernel_size // 2``, stride 1).
        norm: :func:`instseg.modeling.norm.get_norm` name (``""`` / ``None``: no norm) or factory.
        bias: conv bias; default ``True`` without a norm, ``False`` with one.
        last_relu: ``False`` leaves the last conv (and its norm) without a ReLU.
        conv_layer: ``(index, in_channels, out_channels) -> module`` building conv ``index``
            instead of the default ``nn.Conv2d`` (e.g. a :class:`DeformConv` for the last one).

    Layers are built conv first, then its norm, conv by conv, so the global RNG is drawn in the
    same order as a hand-written loop. Weights keep PyTorch's default init (callers re-init).

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` for the default convs.
    """
    if num_convs < 0:
        raise ValueError(f"num_convs must be >= 0, got {num_convs}")
    if bias is None:
        bias = not norm
    layers = []
    ch = in_channels
    for i in range(num_convs):
        if conv_layer is not None:
            layers.append(conv_layer(i, ch, out_channels))
        else:
            layers.append(nn.Conv2d(ch, out_channels, kernel_size, padding=kernel_size // 2, bias=bias))
        n = get_norm(norm, out_channels)
        if n is not None:
            layers.append(n)
        if last_relu or i < num_convs - 1:
            layers.append(nn.ReLU(inplace=True))
        ch = out_channels
    return nn.Sequential(*layers)
