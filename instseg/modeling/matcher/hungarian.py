"""Hungarian assignment shared by every matcher (scipy's ``linear_sum_assignment``).

Costs are checked for NaN/Inf before scipy sees them: under AMP a half-precision overflow in a
cost term would otherwise make scipy raise an opaque error or, worse, return a wrong assignment.

A one-to-one assignment matches at most as many targets as there are predictions: an image with
more ground-truth objects than the model has queries/proposals leaves the extra objects without a
prediction (and without a loss). :func:`warn_if_more_targets_than_predictions` (called by
:func:`hungarian_assign`) logs that once per process.
"""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "NonFiniteCostError",
    "hungarian_assign",
    "batched_hungarian_assign",
    "warn_if_more_targets_than_predictions",
]

logger = logging.getLogger(__name__)
_warned_more_targets = False  # set by the first warning: one per process


def warn_if_more_targets_than_predictions(num_targets: int, num_predictions: int, name: str = "cost") -> bool:
    """Log a warning, once per process, when an image has more targets than predictions.

    A one-to-one matching leaves ``num_targets - num_predictions`` objects of such an image
    unmatched: they get no prediction and add nothing to the loss. Only the sizes are read (host
    integers, no device sync); nothing about the matching changes.

    Args:
        num_targets: ground-truth objects of the image (columns of the cost matrix).
        num_predictions: predictions of the image (queries/proposals; rows of the cost matrix).
        name: the cost's name, shown in the message.

    Returns:
        ``True`` if this call logged the warning (the first such image of the process).
    """
    global _warned_more_targets
    if _warned_more_targets or num_targets <= num_predictions:
        return False
    _warned_more_targets = True
    logger.warning(
        "An image has %d ground-truth objects but the model makes only %d predictions to match them "
        "with (%s): the %d extra objects get no prediction and no loss. Raise the model's number of "
        "queries/proposals above the largest object count of the training images to train on all of "
        "them. (Warned once per process; later images are not reported.)",
        num_targets, num_predictions, name, num_targets - num_predictions,
    )
    return True


class NonFiniteCostError(FloatingPointError):
    """A matching cost matrix contains NaN or Inf. The message names the cost term."""


def hungarian_assign(cost: torch.Tensor, maximize: bool = False, name: str = "cost") -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment for a ``(N, M)`` cost (or score, with ``maximize``) matrix.

    ``M > N`` (more targets than predictions) logs a warning once per process
    (:func:`warn_if_more_targets_than_predictions`); the assignment is the same.

    Returns:
        ``(pred_idx, tgt_idx)``: int64 CPU tensors of length ``min(N, M)``, ``pred_idx`` sorted.
    Raises:
        NonFiniteCostError: the matrix has a NaN or Inf (message names ``name`` and the count).
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be 2-D, got {tuple(cost.shape)}")
    warn_if_more_targets_than_predictions(int(cost.shape[1]), int(cost.shape[0]), name)
    if cost.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    c = cost.detach().float().cpu()
    finite = torch.isfinite(c)
    if not bool(finite.all()):
        raise NonFiniteCostError(f"non-finite values in matching {name}: {int((~finite).sum())} of {c.numel()}")
    rows, cols = linear_sum_assignment(c.numpy(), maximize=maximize)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def batched_hungarian_assign(
    cost: torch.Tensor, sizes: Sequence[int], maximize: bool = False, name: str = "cost"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Assign per image from a batched cost ``(B, N, sum(sizes))``; image ``b`` uses its own
    ``sizes[b]`` target columns. Returns one ``(pred_idx, tgt_idx)`` pair per image, ``tgt_idx``
    local to the image's targets."""
    if cost.shape[-1] != sum(sizes):
        raise ValueError(f"cost has {cost.shape[-1]} target columns, sizes sum to {sum(sizes)}")
    out = []
    for b, c in enumerate(cost.split(list(sizes), dim=-1)):
        out.append(hungarian_assign(c[b], maximize=maximize, name=name))
    return out
