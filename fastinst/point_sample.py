"""Point sampling and PointRend-style importance sampling of mask logits.

Mask2Former-family models (FastInst, supplement and official ``criterion.py``/``matcher.py``;
docs/fastinst.md) compute mask losses and matching costs on a set of sampled points instead of every
pixel: ``K x P`` values rather than ``K x H x W``. Training points are chosen by PointRend's
importance sampling (Kirillov et al., "PointRend", CVPR 2020, Sec. 3.1 "Point Selection for
Training"): oversample ``k * P`` uniform points, keep the ``beta * P`` most uncertain ones
(logit closest to 0) and fill the rest with uniform points.

Coordinates are normalized ``(x, y)`` in ``[0, 1] x [0, 1]`` over the whole map (``(0, 0)`` is the
top-left corner of the top-left pixel with ``align_corners=False``), so one set of points addresses
maps of different resolutions (1/8 predictions and full-size targets) at the same image positions.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["calculate_uncertainty", "point_sample", "uncertain_point_coords_with_randomness"]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalized points (:func:`torch.nn.functional.grid_sample`).

    Args:
        input: ``(N, C, H, W)`` float map.
        point_coords: ``(N, P, 2)`` (or ``(N, Hg, Wg, 2)``) normalized ``(x, y)`` in ``[0, 1]``;
            points outside are sampled as zero (zero padding).
        align_corners: passed to ``grid_sample``; ``False`` (default) treats the map as covering
            ``[0, 1]`` edge to edge.

    Returns:
        ``(N, C, P)`` (or ``(N, C, Hg, Wg)``) in ``input``'s dtype.

    Raises:
        ValueError: ``input`` is not 4-D, the coordinates do not end in 2, or the batch sizes differ.
    """
    if input.dim() != 4:
        raise ValueError(f"point_sample: input must be (N, C, H, W), got {tuple(input.shape)}")
    if point_coords.shape[-1] != 2 or point_coords.dim() not in (3, 4):
        raise ValueError(f"point_sample: point_coords must be (N, P, 2) or (N, H, W, 2), got {tuple(point_coords.shape)}")
    if point_coords.shape[0] != input.shape[0]:
        raise ValueError(f"point_sample: batch sizes differ ({input.shape[0]} maps, {point_coords.shape[0]} point sets)")
    squeeze = point_coords.dim() == 3
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    if squeeze:
        grid = grid.unsqueeze(2)  # (N, P, 1, 2)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.squeeze(3) if squeeze else out


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """PointRend's uncertainty of class-agnostic mask logits: ``-|logit|`` (highest at 0).

    Args:
        logits: ``(R, 1, ...)`` mask logits.

    Returns:
        A tensor of the same shape; larger means more uncertain.

    Raises:
        ValueError: the second dimension is not 1.
    """
    if logits.dim() < 2 or logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects (R, 1, ...) logits, got {tuple(logits.shape)}")
    return -logits.abs()


def uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Importance-sampled training points (PointRend, Sec. 3.1).

    Draws ``int(num_points * oversample_ratio)`` uniform points per map, keeps the
    ``int(importance_sample_ratio * num_points)`` with the highest ``uncertainty_func`` of the
    bilinearly sampled logits, and adds ``num_points`` minus that many fresh uniform points.
    Uses the global torch RNG.

    Args:
        coarse_logits: ``(R, 1, H, W)`` mask logits (one class-agnostic map per prediction).
        uncertainty_func: ``(R, 1, P) -> (R, 1, P)`` uncertainty, e.g. :func:`calculate_uncertainty`.
        num_points: P (FastInst: 112 x 112 = 12,544).
        oversample_ratio: k >= 1 (FastInst: 3.0).
        importance_sample_ratio: beta in [0, 1] (FastInst: 0.75).

    Returns:
        ``(R, num_points, 2)`` normalized ``(x, y)`` in [0, 1], in ``coarse_logits``'s dtype.

    Raises:
        ValueError: ``oversample_ratio < 1``, ``importance_sample_ratio`` outside [0, 1],
            ``num_points < 1`` or ``coarse_logits`` not ``(R, 1, H, W)``.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if coarse_logits.dim() != 4 or coarse_logits.shape[1] != 1:
        raise ValueError(f"coarse_logits must be (R, 1, H, W), got {tuple(coarse_logits.shape)}")
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=coarse_logits.device, dtype=coarse_logits.dtype)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)  # (R, 1, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1).indices  # (R, num_uncertain)
    point_coords = torch.gather(point_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        rand = torch.rand(num_boxes, num_random, 2, device=coarse_logits.device, dtype=coarse_logits.dtype)
        point_coords = torch.cat([point_coords, rand], dim=1)
    return point_coords
