"""Set-prediction matcher with box costs (DETR / Sparse R-CNN / QueryInst).

``C(i, k) = w_cls * focal_cost(p_i, c_k) + w_l1 * ||b_i - t_k||_1 + w_giou * (-GIoU(b_i, t_k))``

with the focal cost of :func:`~instseg.modeling.losses.focal_cost_matrix`, the L1 distance between
xyxy boxes normalized by the image size, and the generalized IoU of the pixel boxes
(:func:`torchvision.ops.generalized_box_iou`). Defaults are QueryInst's (docs/queryinst.md; mmdetection
``HungarianAssigner`` with ``FocalLossCost`` 2.0, ``BBoxL1Cost`` 5.0, ``IoUCost`` giou 2.0).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import generalized_box_iou

from ..losses.focal import focal_cost_matrix
from .hungarian import hungarian_assign

__all__ = ["BoxSetMatcher", "box_cost_matrix"]


def box_cost_matrix(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    image_whwh: torch.Tensor,
    tgt_labels: torch.Tensor,
    tgt_boxes: torch.Tensor,
    cost_class: float = 2.0,
    cost_l1: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """``(N, M)`` matching cost of one image (lower is better), float32, autocast off.

    Args:
        logits: ``(N, K)`` class logits (sigmoid classification).
        boxes: ``(N, 4)`` predicted xyxy boxes in pixels.
        image_whwh: ``(4,)`` ``(width, height, width, height)`` of the image, pixels: the L1 cost is
            computed on boxes divided by it.
        tgt_labels: ``(M,)`` int64 in ``[0, K)``.
        tgt_boxes: ``(M, 4)`` xyxy pixels.

    Raises:
        ValueError: a shape is not as above, or a label is outside ``[0, K)``.
    """
    if logits.dim() != 2 or boxes.shape != (logits.shape[0], 4):
        raise ValueError(f"logits (N, K) and boxes (N, 4) expected, got {tuple(logits.shape)}, {tuple(boxes.shape)}")
    if tgt_boxes.dim() != 2 or tgt_boxes.shape[-1] != 4 or tgt_labels.shape != (tgt_boxes.shape[0],):
        raise ValueError(
            f"tgt_labels (M,) and tgt_boxes (M, 4) expected, got {tuple(tgt_labels.shape)}, {tuple(tgt_boxes.shape)}"
        )
    if tgt_labels.numel() and (int(tgt_labels.min()) < 0 or int(tgt_labels.max()) >= logits.shape[1]):
        raise ValueError(f"target labels must lie in [0, {logits.shape[1]}), got {tgt_labels.tolist()}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float().to(boxes.device)
        whwh = image_whwh.float().to(boxes.device)
        c_cls = focal_cost_matrix(logits.float(), tgt_labels.to(logits.device), focal_alpha, focal_gamma)
        c_l1 = torch.cdist(boxes / whwh, tgt_boxes / whwh, p=1)
        c_giou = -generalized_box_iou(boxes, tgt_boxes)
        return cost_class * c_cls + cost_l1 * c_l1 + cost_giou * c_giou


class BoxSetMatcher(nn.Module):
    """Hungarian matching of N box predictions to M targets per image with :func:`box_cost_matrix`.

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
        """See :func:`box_cost_matrix` (this matcher's weights)."""
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
