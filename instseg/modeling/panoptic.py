"""Semantic and panoptic inference of a query-based mask model (set of (class, mask) predictions).

Mask2Former's rules (``mask2former/maskformer_model.py``, ``MaskFormer.semantic_inference`` and
``MaskFormer.panoptic_inference``, facebookresearch/Mask2Former), which FastInst's supplement
(App. C) follows for its Cityscapes panoptic / semantic results ("according to the practice of
Mask2Former"). Own code, same semantics; the functions take one image's raw network outputs:

* ``mask_cls``: class logits ``(Q, C + 1)``, the last column is "no object";
* ``mask_pred``: mask logits ``(Q, H, W)`` (at whatever size the caller wants the result).

Nothing here names a model; a query-based model of the core calls these after resizing its mask
logits. Not wired into any model or config yet (issue 13, see docs/panoptic_semantic.md).
"""
from __future__ import annotations

from typing import Collection, Dict, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["semantic_inference", "panoptic_inference"]

#: Mask2Former's panoptic configs (``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD`` / ``OVERLAP_THRESHOLD``)
DEFAULT_OBJECT_MASK_THRESHOLD = 0.8
DEFAULT_OVERLAP_THRESHOLD = 0.8


def _check(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> None:
    if mask_cls.dim() != 2 or mask_cls.shape[1] < 2:
        raise ValueError(f"mask_cls must be (Q, C + 1) class logits with C >= 1, got {tuple(mask_cls.shape)}")
    if mask_pred.dim() != 3 or mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(f"mask_pred must be (Q, H, W) mask logits with Q = {mask_cls.shape[0]} "
                         f"(from mask_cls), got {tuple(mask_pred.shape)}")


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class semantic scores: ``sum_q softmax(mask_cls)[q, c] * sigmoid(mask_pred)[q]``.

    Mask2Former ``MaskFormer.semantic_inference``: softmax over the ``C + 1`` logits, the
    no-object column dropped, einsum ``"qc,qhw->chw"`` with the sigmoid mask probabilities.

    Args:
        mask_cls: float ``(Q, C + 1)`` class logits (last column = no object).
        mask_pred: float ``(Q, H, W)`` mask logits.

    Returns:
        float ``(C, H, W)`` (dtype of the inputs' promotion), not normalized over classes; the
        predicted label of a pixel is its argmax over ``C``.

    Raises:
        ValueError: shapes other than the above.
    """
    _check(mask_cls, mask_pred)
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float = DEFAULT_OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation of one image from query predictions (Mask2Former's rule).

    Mask2Former ``MaskFormer.panoptic_inference``:

    1. score, class of each query = max / argmax of ``softmax(mask_cls)`` over all ``C + 1``
       columns; a query is kept when its class is not no-object (``C``) and its score is
       **strictly above** ``object_mask_threshold``;
    2. every pixel goes to the kept query with the highest ``score * sigmoid(mask)`` (argmax; ties
       to the lower query index, as ``torch.argmax``);
    3. for each kept query ``k`` in query order: ``mask_area`` = pixels it wins (step 2, whatever
       its probability), ``original_area`` = pixels with ``sigmoid(mask) >= 0.5``, its segment =
       pixels it wins **and** with ``sigmoid(mask) >= 0.5``. It is dropped unless ``mask_area``,
       ``original_area`` and the segment are all > 0 and ``mask_area / original_area >=
       overlap_threshold``;
    4. a stuff class (not in ``thing_ids``) gets one segment: later queries of the same class
       paint their pixels with the first one's id; things keep one id per query.

    Args:
        mask_cls: float ``(Q, C + 1)`` class logits (last column = no object).
        mask_pred: float ``(Q, H, W)`` mask logits, at the output size.
        thing_ids: the contiguous class ids (``0..C-1``) that are things; the others are stuff.
        object_mask_threshold: Mask2Former's ``OBJECT_MASK_THRESHOLD`` (its panoptic configs: 0.8).
        overlap_threshold: Mask2Former's ``OVERLAP_THRESHOLD`` (its panoptic configs: 0.8).

    Returns:
        ``(panoptic_seg, segments_info)``: ``panoptic_seg`` int32 ``(H, W)`` on ``mask_pred``'s
        device, segment ids ``1..N``, 0 = void (no segment); ``segments_info`` a list of
        ``{"id": int, "isthing": bool, "category_id": int}`` (contiguous class id), in id order.

    Raises:
        ValueError: shapes other than the above.
    """
    _check(mask_cls, mask_pred)
    num_classes = mask_cls.shape[1] - 1
    things = {int(t) for t in thing_ids}
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    probs = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], probs[keep]

    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_ids: Dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        isthing = cls in things
        wins = winner == k
        mask_area = int(wins.sum())
        fg = cur_masks[k] >= 0.5
        original_area = int(fg.sum())
        segment = wins & fg
        if mask_area == 0 or original_area == 0 or not bool(segment.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and cls in stuff_ids:
            panoptic_seg[segment] = stuff_ids[cls]
            continue
        next_id += 1
        if not isthing:
            stuff_ids[cls] = next_id
        panoptic_seg[segment] = next_id
        segments_info.append({"id": next_id, "isthing": bool(isthing), "category_id": cls})
    return panoptic_seg, segments_info
