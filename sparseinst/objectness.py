"""IoU-aware objectness targets (SparseInst, Sec. 3.4 and Table 6)."""
from __future__ import annotations

import torch

__all__ = ["binarized_mask_iou"]


@torch.no_grad()
def binarized_mask_iou(
    pred_logits: torch.Tensor, targets: torch.Tensor, pred_threshold: float = 0.4, target_threshold: float = 0.5
) -> torch.Tensor:
    """IoU of matched pairs after binarization, the objectness target of SparseInst.

    Args:
        pred_logits: ``(K, P)`` mask logits; a pixel is foreground when ``sigmoid >= pred_threshold``
            (0.4 in the official code).
        targets: ``(K, P)`` targets; foreground when ``> target_threshold`` (0.5).
    Returns:
        ``(K,)`` float32 IoU in [0, 1] (0 when both masks are empty).
    """
    p = (pred_logits.float().sigmoid() >= pred_threshold).float()
    t = (targets.float() > target_threshold).float()
    inter = (p * t).sum(-1)
    union = p.sum(-1) + t.sum(-1) - inter
    return inter / (union + 1e-6)
