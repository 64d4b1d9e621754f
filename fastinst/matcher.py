"""Hungarian matching of mask queries with class, mask (BCE), dice and location costs.

The Mask2Former-style matcher used by FastInst (official ``fastinst/modeling/matcher.py``,
docs/fastinst.md; supplement A.2 and Table II), in two forms:

* :meth:`MaskLocationMatcher.forward` — queries against ground-truth instances:
  ``C = w_cls * (-p[label]) + w_mask * BCE + w_dice * (1 - dice) + w_loc * outside``, with the mask
  terms computed on ``num_points`` uniform random points shared by all queries and targets of an
  image (BCE averaged over the points; dice with +1 smoothing on numerator and denominator), and
  ``outside`` = 1 when the query's pixel location (its position in E4) does not fall inside the
  target mask (bilinear sample of the mask at the location is 0), else 0. The official code adds
  ``-w_loc`` for "inside" instead of ``+w_loc`` for "outside": the two differ by a constant per
  target column and give the same assignment.
* :meth:`MaskLocationMatcher.match_pixels` — every pixel of the auxiliary classifier's map
  (FastInst's IA-guided query proposals) against the targets, with the class and location costs
  only; a pixel is inside a target when the target mask average-pooled to the map's size is > 0.

Costs are computed in float32 with autocast disabled and checked for NaN/Inf before scipy
(:func:`instseg.modeling.matcher.hungarian_assign`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.losses import dice_coefficient_matrix
from instseg.modeling.matcher import NonFiniteCostError, hungarian_assign

from .point_sample import point_sample

__all__ = ["MaskLocationMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost", "location_cost"]

_Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def batch_sigmoid_ce_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy between ``(N, P)`` logits and ``(M, P)`` targets in
    [0, 1] -> ``(N, M)`` float32 (averaged over the P points)."""
    x, t = pred_logits.float(), targets.float()
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return (pos @ t.t() + neg @ (1 - t).t()) / max(x.shape[1], 1)


def batch_dice_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice cost ``1 - (2 sum p t + 1) / (sum p + sum t + 1)`` between ``(N, P)`` logits
    and ``(M, P)`` targets -> ``(N, M)`` float32 (Mask2Former/FastInst smoothing)."""
    return 1 - dice_coefficient_matrix(pred_logits, targets, squared=False, eps_num=1.0, eps_den=1.0)


def location_cost(query_locations: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """1 where a query's location lies outside a target mask, else 0 (supplement A.2).

    Args:
        query_locations: ``(N, 2)`` normalized ``(x, y)`` in [0, 1] (the query's pixel in E4).
        target_masks: ``(M, H, W)`` masks (bool or float) covering the same normalized extent
            (the padded input).

    Returns:
        ``(N, M)`` float32 in {0, 1}. "Inside" means the bilinear sample of the mask at the
        location is > 0 (official ``matcher.py``), i.e. one of the 4 nearest mask pixels is set.
    """
    if query_locations.dim() != 2 or query_locations.shape[-1] != 2:
        raise ValueError(f"query_locations must be (N, 2), got {tuple(query_locations.shape)}")
    if target_masks.dim() != 3:
        raise ValueError(f"target_masks must be (M, H, W), got {tuple(target_masks.shape)}")
    if target_masks.shape[0] == 0:
        return query_locations.new_zeros((query_locations.shape[0], 0), dtype=torch.float32)
    inside = point_sample(target_masks.float()[None], query_locations.float()[None], align_corners=False)[0]  # (M, N)
    return (inside <= 0).float().t()


class MaskLocationMatcher(nn.Module):
    """Bipartite matching for mask-classification queries (see the module docstring).

    Args:
        cost_class: weight of ``-softmax(logits)[label]`` (FastInst: 2.0).
        cost_mask: weight of the point-sampled BCE (5.0).
        cost_dice: weight of the point-sampled dice cost (5.0).
        cost_location: weight of the location cost (1000.0; 0 switches it off, supplement Table II).
        num_points: points sampled per image for the mask costs (12,544).

    Raises:
        ValueError: all of class, mask and dice weights are 0, or ``num_points < 1``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        cost_location: float = 1000.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("MaskLocationMatcher: class, mask and dice cost weights cannot all be 0")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.cost_location = float(cost_location)
        self.num_points = int(num_points)

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        tgt_labels: torch.Tensor,
        tgt_masks: torch.Tensor,
        query_locations: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted cost terms of one image.

        Args:
            pred_logits: ``(N, K + 1)`` class logits (last = no object).
            pred_masks: ``(N, h, w)`` mask logits.
            tgt_labels: int64 ``(M,)`` in ``[0, K)``.
            tgt_masks: ``(M, H, W)`` masks covering the same extent as ``pred_masks``.
            query_locations: ``(N, 2)`` normalized ``(x, y)`` or ``None`` (no location cost).

        Returns:
            ``{"class", "mask", "dice", "location", "total"}``, each ``(N, M)`` float32 and already
            multiplied by its weight.
        """
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            n, m = pred_logits.shape[0], tgt_labels.shape[0]
            prob = pred_logits.float().softmax(-1)
            costs = {"class": -prob[:, tgt_labels] * self.cost_class}
            if m == 0:
                zero = prob.new_zeros((n, 0))
                costs.update(mask=zero, dice=zero, location=zero, total=zero)
                return costs
            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
            tgt = point_sample(tgt_masks.float()[None], coords)[0]  # (M, P)
            out = point_sample(pred_masks.float()[None], coords)[0]  # (N, P)
            costs["mask"] = batch_sigmoid_ce_cost(out, tgt) * self.cost_mask
            costs["dice"] = batch_dice_cost(out, tgt) * self.cost_dice
            if query_locations is not None and self.cost_location != 0:
                costs["location"] = location_cost(query_locations, tgt_masks) * self.cost_location
            else:
                costs["location"] = torch.zeros_like(costs["mask"])
            costs["total"] = costs["class"] + costs["mask"] + costs["dice"] + costs["location"]
            return costs

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        query_locations: Optional[torch.Tensor] = None,
    ) -> _Indices:
        """Match the queries of each image with its targets.

        Args:
            pred_logits: ``(B, N, K + 1)`` class logits.
            pred_masks: ``(B, N, h, w)`` mask logits (at a stride of the padded input).
            targets: ``B`` dicts with ``"labels"`` int64 ``(M_b,)`` and ``"masks"`` ``(M_b, Hp, Wp)``
                (bool or float, zero-padded to the padded input).
            query_locations: ``(B, N, 2)`` normalized ``(x, y)`` of the queries, or ``None``.

        Returns:
            per image ``(pred_idx, tgt_idx)`` int64 CPU tensors of length ``min(N, M_b)``.

        Raises:
            ValueError: the batch sizes differ.
            NonFiniteCostError: a NaN/Inf cost (the message names the term).
        """
        if pred_logits.shape[0] != len(targets) or pred_masks.shape[0] != len(targets):
            raise ValueError(f"{pred_logits.shape[0]} predictions for {len(targets)} targets")
        indices = []
        for b, t in enumerate(targets):
            loc = None if query_locations is None else query_locations[b]
            costs = self.cost_matrix(pred_logits[b], pred_masks[b], t["labels"], t["masks"], loc)
            for name in ("class", "mask", "dice", "location"):
                bad = ~torch.isfinite(costs[name])
                if bool(bad.any()):
                    raise NonFiniteCostError(
                        f"non-finite values in matching {name} cost: {int(bad.sum())} of {bad.numel()}"
                    )
            indices.append(hungarian_assign(costs["total"], name="class+mask+dice+location cost"))
        return indices

    @torch.no_grad()
    def match_pixels(self, pixel_logits: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]]) -> _Indices:
        """Match every pixel of a per-pixel classifier map with the targets (FastInst proposals).

        Args:
            pixel_logits: ``(B, K + 1, h, w)`` logits of the auxiliary classifier on E4.
            targets: as in :meth:`forward`.

        Returns:
            per image ``(pixel_idx, tgt_idx)``; ``pixel_idx`` indexes the flattened ``h * w`` map.
        """
        b_size, _, h, w = pixel_logits.shape
        if b_size != len(targets):
            raise ValueError(f"{b_size} proposal maps for {len(targets)} targets")
        indices = []
        with torch.autocast(device_type=pixel_logits.device.type, enabled=False):
            for b, t in enumerate(targets):
                prob = pixel_logits[b].float().flatten(1).t().softmax(-1)  # (hw, K + 1)
                labels, masks = t["labels"], t["masks"]
                cost = -prob[:, labels] * self.cost_class
                if labels.numel() and self.cost_location != 0:
                    pooled = F.adaptive_avg_pool2d(masks.float()[None], (h, w))[0]  # (M, h, w)
                    cost = cost + (pooled <= 0).float().flatten(1).t() * self.cost_location
                indices.append(hungarian_assign(cost, name="proposal class+location cost"))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
            f"cost_location={self.cost_location}, num_points={self.num_points}"
        )
