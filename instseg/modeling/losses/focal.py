"""Sigmoid focal loss (Lin et al., ICCV 2017) and the focal classification cost for matching.

The loss itself is :func:`torchvision.ops.sigmoid_focal_loss`; this module adds the one-hot
target construction used by SparseInst/QueryInst and the pairwise focal *cost* used by
Sparse R-CNN/QueryInst matchers (``cost = pos - neg`` evaluated at the target class).
"""
from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss", "focal_classification_loss", "focal_cost_matrix"]


def focal_classification_loss(
    logits: torch.Tensor,
    target_classes: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Summed sigmoid focal loss against one-hot targets.

    Args:
        logits: ``(P, K)`` class logits of P predictions.
        target_classes: ``(P,)`` int64, a class in ``[0, K)`` or ``K`` for background (all-zero
            target row).
    Returns:
        scalar float32 sum (callers divide by the number of instances).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (P, K), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if target_classes.numel() and (target_classes.min() < 0 or target_classes.max() > num_classes):
        raise ValueError(f"target classes must lie in [0, {num_classes}]")
    onehot = torch.zeros_like(logits, dtype=torch.float32)
    fg = target_classes < num_classes
    onehot[fg.nonzero(as_tuple=True)[0], target_classes[fg]] = 1.0
    return sigmoid_focal_loss(logits.float(), onehot, alpha=alpha, gamma=gamma, reduction="sum")


def focal_cost_matrix(
    logits: torch.Tensor, target_labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal classification cost ``(P, M)`` between P predictions and M targets (lower is better).

    ``cost = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at each target's class
    (Deformable DETR / Sparse R-CNN matcher). Computed in float32.
    """
    prob = logits.float().sigmoid()
    eps = 1e-8
    neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + eps).log())
    pos = alpha * (1 - prob).pow(gamma) * (-(prob + eps).log())
    return pos[:, target_labels] - neg[:, target_labels]
