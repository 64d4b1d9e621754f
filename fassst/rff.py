"""Pyramid mask layers and ROI feature fusion (RFF) of FASSST (Sec. 3.3, Eq. 3-4, Fig. 5; Table 9).

Pyramid mask layers turn backbone maps at strides ``s, 2s, 4s`` (reading: 8/16/32) into ``dim``
channels; the ROIs located by the IAM are cut from each of them with
:func:`torchvision.ops.roi_align` at sizes ``S, S/2, S/4`` (``R1``, ``R2``, ``R3``: "R2 has a
spatial size double that of R3, and R1 is double that of R2"), which samples every level at its
own resolution, and the RFF fuses them (Eq. 4)::

    R = ReLU(R1 + up(R2 + up(R3))),    up = bilinear x2 (Eq. 3)

Without RFF (Table 9 "without") ``R = R1``: "we directly feed ROI features of the first pyramid
mask layer to the following part".

Reading (docs/fassst.md): each pyramid mask layer is ``NUM_CONVS`` 3x3 convs whose last one has
a norm but no activation (the ReLU of Eq. 4 is the activation); ``align_corners=False``
upsampling; ROI boxes are xyxy in input pixels and ``spatial_scale = 1 / stride`` maps them onto
each level.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from instseg.modeling.layers import conv_norm_relu_stack

__all__ = ["PyramidMaskLayers", "RoIFeatureFusion", "fuse_roi_features", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("bilinear", "nearest")


def fuse_roi_features(rois: Sequence[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """Eq. 3-4 for any number of levels: ``ReLU(R1 + up(R2 + up(R3 + ...)))``.

    Args:
        rois: ``[R1, R2, R3]``, ``R_k`` of shape ``(K, C, S / 2**(k-1), S / 2**(k-1))``.
        mode: ``"bilinear"`` (Eq. 3, ``align_corners=False``) or ``"nearest"``.

    Returns:
        ``(K, C, S, S)``.

    Raises:
        ValueError: fewer than 2 levels, an unknown mode, or sizes that do not double.
    """
    if len(rois) < 2:
        raise ValueError(f"RFF needs at least 2 ROI levels, got {len(rois)}")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"MODEL.FASSST.RFF.UPSAMPLE must be one of {UPSAMPLE_MODES}, got '{mode}'")
    acc = rois[-1]
    for r in reversed(rois[:-1]):
        if tuple(r.shape[-2:]) != (2 * acc.shape[-2], 2 * acc.shape[-1]) or r.shape[:2] != acc.shape[:2]:
            raise ValueError(f"RFF: ROI feature {tuple(r.shape)} is not double the size of {tuple(acc.shape)}")
        up = F.interpolate(acc, scale_factor=2.0, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        acc = r + up
    return F.relu(acc)


class PyramidMaskLayers(nn.Module):
    """One mask layer per pyramid level: ``NUM_CONVS`` 3x3 convs to ``dim`` channels.

    Args:
        in_channels: channels of each level's backbone map (``[C1, C2, C3]``).
        dim: output channels.
        num_convs: convs per level; all but the last are followed by norm + ReLU, the last by
            norm only.
        norm: ``""``, ``"BN"``, ``"GN"``, ...

    Forward: ``[(B, C_k, H_k, W_k)]`` -> ``[(B, dim, H_k, W_k)]``.

    Raises:
        ValueError: ``num_convs < 1``, or the number of inputs differs from ``in_channels``.
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, num_convs: int = 1, norm: str = "BN"):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"MODEL.FASSST.PYRAMID.NUM_CONVS must be >= 1, got {num_convs}")
        self.layers = nn.ModuleList(conv_norm_relu_stack(num_convs, c, dim, 3, norm, last_relu=False) for c in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} pyramid levels, got {len(features)}")
        return [layer(f) for layer, f in zip(self.layers, features)]


class RoIFeatureFusion(nn.Module):
    """ROI features from the pyramid mask layers and their fusion (Eq. 3-4).

    Args:
        strides: stride of each pyramid level in input pixels, each double the previous one
            (``[8, 16, 32]``).
        roi_size: side ``S`` of ``R1``; level ``k`` is pooled at ``S / 2**k`` (must divide).
        enabled: RFF on (Eq. 4) or off (``R = R1``, Table 9).
        upsample: ``"bilinear"`` (Eq. 3) or ``"nearest"``.
        sampling_ratio, aligned: :func:`torchvision.ops.roi_align` options.

    Raises:
        ValueError: strides that do not double, or ``roi_size`` not divisible by
            ``2**(levels - 1)``.
    """

    def __init__(
        self,
        strides: Sequence[int],
        roi_size: int = 16,
        enabled: bool = True,
        upsample: str = "bilinear",
        sampling_ratio: int = 0,
        aligned: bool = True,
    ):
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides:
            raise ValueError("RFF needs at least one pyramid level")
        for a, b in zip(strides, strides[1:]):
            if b != 2 * a:
                raise ValueError(f"pyramid mask layers must have strides that double (Sec. 3.3), got {strides}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"MODEL.FASSST.RFF.UPSAMPLE must be one of {UPSAMPLE_MODES}, got '{upsample}'")
        self.enabled = bool(enabled)
        self.strides = strides if self.enabled else strides[:1]
        if self.enabled and len(self.strides) < 2:
            raise ValueError("RFF enabled needs at least 2 pyramid levels")
        div = 2 ** (len(self.strides) - 1)
        if roi_size < 1 or roi_size % div:
            raise ValueError(f"MODEL.FASSST.RFF.ROI_SIZE must be a positive multiple of {div}, got {roi_size}")
        self.roi_size = int(roi_size)
        self.upsample = upsample
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def roi_features(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> List[torch.Tensor]:
        """``[R1, R2, ...]``: level ``k`` pooled at ``roi_size / 2**k`` with ``spatial_scale =
        1 / strides[k]``.

        Args:
            features: ``[(B, C, Hp / s_k, Wp / s_k)]`` for the used levels.
            rois: ``(K, 5)`` float ``(batch_index, x1, y1, x2, y2)``, boxes in input pixels.
        Returns:
            ``[(K, C, S / 2**k, S / 2**k)]``.
        """
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be (K, 5) (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}")
        out = []
        for k, (feat, stride) in enumerate(zip(features, self.strides)):
            size = self.roi_size >> k
            out.append(
                roi_align(
                    feat,
                    rois.to(feat.dtype),
                    output_size=(size, size),
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.sampling_ratio,
                    aligned=self.aligned,
                )
            )
        return out

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """Pyramid mask features + ROIs -> fused ``R`` ``(K, C, S, S)`` (``R1`` when disabled)."""
        features = list(features)[: self.num_levels]
        if len(features) != self.num_levels:
            raise ValueError(f"RFF expects {self.num_levels} pyramid levels, got {len(features)}")
        rs = self.roi_features(features, rois)
        if not self.enabled:
            return rs[0]
        return fuse_roi_features(rs, self.upsample)
