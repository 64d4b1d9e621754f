"""Box matching cost shared by the set-prediction box models (DETR / Sparse R-CNN: QueryInst, FASSST).

``C(i, k) = w_cls * focal_cost(p_i, c_k) + w_l1 * ||b_i - t_k||_1 + w_giou * (-GIoU(b_i, t_k))``

with the focal cost of :func:`~instseg.modeling.losses.focal_cost_matrix`, the L1 distance between
boxes divided by ``image_whwh`` and the generalized IoU (:func:`torchvision.ops.generalized_box_iou`).
Defaults are QueryInst's (docs/queryinst.md; mmdetection ``HungarianAssigner`` with
``FocalLossCost`` 2.0, ``BBoxL1Cost`` 5.0, ``IoUCost`` giou 2.0); FASSST passes its own weights,
its normalized boxes and, for ``MATCHER.LOC_COST = "focal"``, its own location term.
"""
from __future__ import annotations

from typing import Optional

import torch
from torchvision.ops import generalized_box_iou

from ..losses.focal import focal_cost_matrix

__all__ = ["box_cost_matrix"]


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
    loc_cost: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(N, M)`` matching cost of one image (lower is better), float32, autocast off.

    Args:
        logits: ``(N, K)`` class logits (sigmoid classification).
        boxes: ``(N, 4)`` predicted xyxy boxes (pixels, or any unit shared with ``tgt_boxes``).
        image_whwh: ``(4,)`` ``(width, height, width, height)`` of the image in the boxes' unit:
            the L1 cost is computed on boxes divided by it (ones for boxes already normalized).
        tgt_labels: ``(M,)`` int64 in ``[0, K)``.
        tgt_boxes: ``(M, 4)`` xyxy, same unit as ``boxes``.
        cost_class, cost_l1, cost_giou: weights of the three terms.
        focal_alpha, focal_gamma: of the focal cost.
        loc_cost: optional ``(N, M)`` location cost that replaces the L1 distance (still weighted
            by ``cost_l1``; FASSST's focal coordinate cost, ``MATCHER.LOC_COST = "focal"``).

    The L1 and GIoU terms are symmetric under swapping x and y, so boxes given as ``(y1, x1, y2,
    x2)`` (FASSST's normalized ``(t, l, b, r)``) give the same cost, bit for bit.

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
    if loc_cost is not None and loc_cost.shape != (boxes.shape[0], tgt_boxes.shape[0]):
        raise ValueError(f"loc_cost must be (N, M) = {(boxes.shape[0], tgt_boxes.shape[0])}, got {tuple(loc_cost.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float().to(boxes.device)
        c_cls = focal_cost_matrix(logits.float(), tgt_labels.to(logits.device), focal_alpha, focal_gamma)
        if loc_cost is None:
            whwh = image_whwh.float().to(boxes.device)
            c_l1 = torch.cdist(boxes / whwh, tgt_boxes / whwh, p=1)
        else:
            c_l1 = loc_cost.float()
        c_giou = -generalized_box_iou(boxes, tgt_boxes)
        return cost_class * c_cls + cost_l1 * c_l1 + cost_giou * c_giou
