"""QueryInst's set-prediction matcher: Hungarian assignment per image with the shared box cost
(:func:`instseg.modeling.matcher.box_cost_matrix`: focal class cost, L1 between xyxy boxes
normalized by the image size, GIoU of the pixel boxes). Defaults are QueryInst's (docs/queryinst.md;
mmdetection ``HungarianAssigner`` with ``FocalLossCost`` 2.0, ``BBoxL1Cost`` 5.0, ``IoUCost`` giou 2.0).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from instseg.modeling.matcher import box_cost_matrix, hungarian_assign

__all__ = ["BoxSetMatcher"]


class BoxSetMatcher(nn.Module):
    """Hungarian matching of N box predictions to M targets per image with
    :func:`~instseg.modeling.matcher.box_cost_matrix`.

    Args:
        cost_class, cost_l1, cost_giou: cost weights (QueryInst: 2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: of the focal cost (0.25, 2.0).

    Raises:
        ValueError: a negative weight, or all weights zero.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if min(cost_class, cost_l1, cost_giou) < 0 or (cost_class == cost_l1 == cost_giou == 0):
            raise ValueError(f"matching cost weights must be >= 0 and not all 0, got {cost_class}, {cost_l1}, {cost_giou}")
        self.cost_class, self.cost_l1, self.cost_giou = cost_class, cost_l1, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits, boxes, image_whwh, tgt_labels, tgt_boxes) -> torch.Tensor:
        """See :func:`~instseg.modeling.matcher.box_cost_matrix` (this matcher's weights)."""
        return box_cost_matrix(
            logits, boxes, image_whwh, tgt_labels, tgt_boxes,
            self.cost_class, self.cost_l1, self.cost_giou, self.focal_alpha, self.focal_gamma,
        )

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        image_whwh: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image.

        Args:
            pred_logits: ``(B, N, K)``.
            pred_boxes: ``(B, N, 4)`` xyxy pixels.
            image_whwh: ``(B, 4)`` per-image ``(w, h, w, h)``.
            targets: per image ``"labels"`` ``(M_b,)`` and ``"boxes"`` ``(M_b, 4)`` xyxy pixels.
        Returns:
            per image ``(pred_idx, tgt_idx)``: int64 CPU tensors of length ``min(N, M_b)``.
        Raises:
            NonFiniteCostError: a cost is NaN/Inf (the message names the image).
        """
        out = []
        for b, tgt in enumerate(targets):
            if tgt["labels"].numel() == 0:
                e = torch.empty(0, dtype=torch.int64)
                out.append((e, e.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_boxes[b], image_whwh[b], tgt["labels"], tgt["boxes"])
            out.append(hungarian_assign(cost, name=f"box-matching cost of image {b}"))
        return out
