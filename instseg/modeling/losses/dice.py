"""Dice coefficient and dice loss on mask logits (V-Net dice, as used by SparseInst, FastInst,
QueryInst).

SparseInst (Eq. 2) uses the squared denominator ``sum m^2 + sum t^2`` with ``eps = 1e-4`` added
to the denominator only (official ``sparseinst/loss.py``); Mask2Former/FastInst use the plain sum
with ``+1`` on numerator and denominator; QueryInst (mmdetection ``DiceLoss``) uses the squared
denominator with ``eps = 1e-5``. The functions take those choices as arguments.
"""
from __future__ import annotations

import torch

__all__ = ["dice_coefficient_matrix", "dice_loss"]


def _prep(pred_logits: torch.Tensor, targets: torch.Tensor):
    if pred_logits.dim() != 2 or targets.dim() != 2:
        raise ValueError(
            f"dice expects flattened (N, P) inputs, got {tuple(pred_logits.shape)} and {tuple(targets.shape)}"
        )
    return pred_logits.float().sigmoid(), targets.float()


def dice_coefficient_matrix(
    pred_logits: torch.Tensor,
    targets: torch.Tensor,
    squared: bool = True,
    eps_num: float = 0.0,
    eps_den: float = 1e-4,
) -> torch.Tensor:
    """Pairwise dice coefficients between every prediction and every target.

    Args:
        pred_logits: ``(N, P)`` mask logits (any float dtype; computed in float32).
        targets: ``(M, P)`` target masks in [0, 1].
        squared: denominator ``sum p^2 + sum t^2`` (True, SparseInst Eq. 2) or ``sum p + sum t``.
        eps_num, eps_den: smoothing added to numerator and denominator.

    Returns:
        ``(N, M)`` float32 dice coefficients ``(2 sum p t + eps_num) / (den + eps_den)``.
    """
    p, t = _prep(pred_logits, targets)
    numerator = 2 * p @ t.t() + eps_num
    if squared:
        den = (p * p).sum(-1)[:, None] + (t * t).sum(-1)[None, :]
    else:
        den = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    return numerator / (den + eps_den)


def dice_loss(
    pred_logits: torch.Tensor,
    targets: torch.Tensor,
    squared: bool = True,
    eps_num: float = 0.0,
    eps_den: float = 1e-4,
    reduction: str = "sum",
) -> torch.Tensor:
    """Dice loss ``1 - dice`` between matched pairs (row i of predictions with row i of targets).

    Args:
        pred_logits: ``(K, P)`` mask logits.
        targets: ``(K, P)`` targets in [0, 1].
        reduction: "sum" (callers divide by the number of instances), "mean" or "none" (``(K,)``).

    Raises:
        ValueError: shapes differ or reduction is unknown.
    """
    if pred_logits.shape != targets.shape:
        raise ValueError(f"dice_loss: shapes differ {tuple(pred_logits.shape)} vs {tuple(targets.shape)}")
    p, t = _prep(pred_logits, targets)
    numerator = 2 * (p * t).sum(-1) + eps_num
    if squared:
        den = (p * p).sum(-1) + (t * t).sum(-1)
    else:
        den = p.sum(-1) + t.sum(-1)
    loss = 1 - numerator / (den + eps_den)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction '{reduction}'")
