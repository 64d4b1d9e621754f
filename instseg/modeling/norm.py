"""Normalization layers by name, Detectron2 style (``"BN"``, ``"SyncBN"``, ``"FrozenBN"``, ``"GN"``).

``get_norm(name, channels)`` builds one layer; ``convert_norm(module, name)`` replaces every batch
norm inside a library model (torchvision / timm ResNet, MobileNetV2) by the named one, copying the
statistics and affine parameters so that pretrained weights survive the conversion.

FrozenBN is torchvision's :class:`~torchvision.ops.misc.FrozenBatchNorm2d` (eps 1e-5, as
Detectron2's; subclassed here to keep the input dtype under AMP): scale, shift and statistics are
*buffers*, so a FrozenBN ResNet-50 has only its
23,454,912 convolution weights as parameters (``tests/refs/README.md``).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d as _TorchvisionFrozenBN

__all__ = ["FrozenBatchNorm2d", "NORM_NAMES", "convert_norm", "freeze_batchnorm", "get_norm", "norm_layer"]

#: Names accepted by :func:`get_norm` and :func:`convert_norm`.
NORM_NAMES = ("", "BN", "SyncBN", "FrozenBN", "GN")

#: Groups of GroupNorm (Detectron2's ``"GN"`` is GroupNorm with 32 groups).
GN_GROUPS = 32


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's FrozenBatchNorm2d (buffers ``weight``, ``bias``, ``running_mean``,
    ``running_var``; eps 1e-5; ``num_batches_tracked`` dropped when loading) whose output keeps the
    input's dtype, as Detectron2's does: under AMP a float16 input gives a float16 output instead
    of being promoted to float32 by the float32 buffers.

    Without gradients (inference, and the frozen stages of a training backbone) and with a float32
    input, the layer is one fused ``F.batch_norm(..., training=False)`` call, as Detectron2's
    ``FrozenBatchNorm2d.forward`` (``detectron2/layers/batch_norm.py``) does: one op instead of a
    multiply and an add, the same values up to float rounding. Otherwise (an input that needs
    gradients, or another dtype under AMP) it computes ``x * scale + bias`` in the input's dtype.

    Shapes: ``(B, C, H, W)`` -> same shape and dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad and x.dtype == self.weight.dtype:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + bias.to(x.dtype).reshape(1, -1, 1, 1)


def _check(name: str) -> None:
    if name not in NORM_NAMES:
        raise ValueError(f"Unknown norm '{name}'; expected one of {list(NORM_NAMES)}")


def get_norm(name: Union[str, Callable[[int], nn.Module], None], channels: int) -> Optional[nn.Module]:
    """Return a normalization layer for ``channels`` feature channels, or ``None``.

    Args:
        name: ``""`` / ``None`` (no norm: returns ``None``), ``"BN"`` (:class:`nn.BatchNorm2d`),
            ``"SyncBN"`` (:class:`nn.SyncBatchNorm`; behaves as BN without a process group),
            ``"FrozenBN"`` (:class:`FrozenBatchNorm2d`, statistics and affine as buffers) or
            ``"GN"`` (:class:`nn.GroupNorm` with 32 groups); or a callable ``channels -> module``.
        channels: number of channels ``C`` of the ``(B, C, H, W)`` input.

    Raises:
        ValueError: unknown name, or ``"GN"`` with ``channels`` not divisible by 32.
    """
    if name is None or name == "":
        return None
    if callable(name):
        return name(channels)
    _check(name)
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if channels % GN_GROUPS:
        raise ValueError(f"GN needs channels divisible by {GN_GROUPS}, got {channels}")
    return nn.GroupNorm(GN_GROUPS, channels)


def norm_layer(name: str) -> Optional[Callable[[int], nn.Module]]:
    """``channels -> module`` factory for ``name`` (``None`` for ``""``), e.g. for torchvision's
    ``norm_layer=`` arguments. Raises ``ValueError`` for an unknown name."""
    if name is None or name == "":
        return None
    _check(name)
    return lambda channels: get_norm(name, channels)


def _convert_one(bn: nn.Module, name: str) -> nn.Module:
    """A new ``name`` layer carrying ``bn``'s affine parameters and statistics (where it has them)."""
    channels = bn.num_features
    new = get_norm(name, channels)
    if new is None:  # "" -> identity
        return nn.Identity()
    with torch.no_grad():
        if isinstance(new, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            if bn.affine:
                new.weight.copy_(bn.weight.detach())
                new.bias.copy_(bn.bias.detach())
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
                if isinstance(new, nn.modules.batchnorm._BatchNorm) and bn.num_batches_tracked is not None:
                    new.num_batches_tracked.copy_(bn.num_batches_tracked)
            if isinstance(new, FrozenBatchNorm2d):
                new.eps = bn.eps
            else:
                new.eps, new.momentum = bn.eps, bn.momentum
        elif isinstance(new, nn.GroupNorm) and bn.affine:
            new.weight.copy_(bn.weight.detach())
            new.bias.copy_(bn.bias.detach())
    ref = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
    if ref is not None:
        new.to(ref.device)
    return new


def convert_norm(module: nn.Module, name: str) -> nn.Module:
    """Replace every batch norm (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``) in ``module`` by ``name``.

    Works in place on children and returns the (possibly new) top module, so call it as
    ``model = convert_norm(model, "FrozenBN")``. Affine parameters and running statistics are
    copied into BN / SyncBN / FrozenBN; GN keeps the affine parameters only; ``""`` gives
    ``nn.Identity``. Existing FrozenBN and GN layers are left as they are (they are not batch norms).

    Raises:
        ValueError: unknown ``name``.
    """
    _check(name)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if name == "BN" and type(module) is nn.BatchNorm2d:
            return module
        if name == "SyncBN" and isinstance(module, nn.SyncBatchNorm):
            return module
        return _convert_one(module, name)
    for child_name, child in module.named_children():
        new_child = convert_norm(child, name)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every trainable batch norm of ``module`` into FrozenBN (Detectron2's treatment of the
    batch norms of frozen stages); GroupNorm is left to ``requires_grad = False``."""
    return convert_norm(module, "FrozenBN")
