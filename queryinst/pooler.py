"""Multi-level RoIAlign: ``P^box`` (7x7) and ``P^mask`` (14x14) of QueryInst.

Each box is pooled from one FPN level chosen by its size, as mmdetection's ``SingleRoIExtractor``
(the official code; docs/queryinst.md) and torchvision's ``LevelMapper`` do:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels, with
``finest_scale = 56`` — boxes below 112 px go to P2, 112-224 to P3, 224-448 to P4, larger to P5
(identical to torchvision's canonical 224 -> level 4). Pooling is :func:`torchvision.ops.roi_align`
with ``aligned=True`` (half-pixel offset, mmcv's ``RoIAlign`` default) and sampling ratio 2.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

__all__ = ["RoIPooler", "assign_fpn_levels", "boxes_to_rois"]


def assign_fpn_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """Level index in ``[0, num_levels)`` (0 = the finest given level, P2) of each ``(R, 4)`` xyxy box.

    Returns ``(R,)`` int64. Degenerate (zero-area) boxes go to level 0.
    """
    scale = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).to(torch.int64)


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image ``(R_i, 4)`` boxes -> ``(sum R_i, 5)`` rois ``(image index, x1, y1, x2, y2)``."""
    return torch.cat(
        [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1) for i, b in enumerate(boxes)], dim=0
    )


class RoIPooler(nn.Module):
    """RoIAlign from the FPN level chosen by box size (see the module docstring).

    Args:
        output_size: S (7 for boxes, 14 for masks).
        strides: strides of the given feature maps, finest first (``(4, 8, 16, 32)`` for P2-P5).
        sampling_ratio: RoIAlign samples per bin side (2).
        finest_scale: box scale that maps to the boundary of the first level (56).
        aligned: half-pixel-aligned RoIAlign (True).

    Forward:
        features: list of ``(B, C, H_l, W_l)``, one per stride.
        boxes: list of ``B`` tensors ``(R_i, 4)`` xyxy in input pixels.
        returns ``(sum R_i, C, S, S)`` in image-major order, the dtype of the features.

    Raises:
        ValueError: the number of feature maps differs from the number of strides, or the number of
            box lists from the batch size.
    """

    def __init__(
        self,
        output_size: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        sampling_ratio: int = 2,
        finest_scale: float = 56.0,
        aligned: bool = True,
    ):
        super().__init__()
        self.output_size = int(output_size)
        self.strides = [int(s) for s in strides]
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = float(finest_scale)
        self.aligned = bool(aligned)

    def forward(self, features: List[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.strides):
            raise ValueError(f"RoIPooler: {len(features)} feature maps for {len(self.strides)} strides")
        if len(boxes) != features[0].shape[0]:
            raise ValueError(f"RoIPooler: {len(boxes)} box lists for a batch of {features[0].shape[0]}")
        rois = boxes_to_rois([b.to(features[0].dtype) for b in boxes])
        c, s = features[0].shape[1], self.output_size
        out = features[0].new_zeros((rois.shape[0], c, s, s))
        if rois.shape[0] == 0:
            return out
        if len(features) == 1:
            return roi_align(features[0], rois, s, 1.0 / self.strides[0], self.sampling_ratio, self.aligned)
        levels = assign_fpn_levels(rois[:, 1:], len(features), self.finest_scale)
        if torch.jit.is_tracing():
            # ONNX export (instseg/export.py): no branch on, and no shape from, the data-dependent
            # count of RoIs per level: every level pools every RoI and each RoI keeps the result of
            # its own level (torch.where selects, so the values are the ones below).
            for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
                pooled = roi_align(feat, rois, s, 1.0 / stride, self.sampling_ratio, self.aligned).to(out.dtype)
                out = pooled if lvl == 0 else torch.where((levels == lvl)[:, None, None, None], pooled, out)
            return out
        for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if idx.numel() == 0:
                continue
            out[idx] = roi_align(feat, rois[idx], s, 1.0 / stride, self.sampling_ratio, self.aligned).to(out.dtype)
        return out
