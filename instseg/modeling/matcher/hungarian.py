"""Hungarian assignment shared by every matcher (scipy's ``linear_sum_assignment``).

Costs are checked for NaN/Inf before scipy sees them: under AMP a half-precision overflow in a
cost term would otherwise make scipy raise an opaque error or, worse, return a wrong assignment.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["NonFiniteCostError", "hungarian_assign", "batched_hungarian_assign"]


class NonFiniteCostError(FloatingPointError):
    """A matching cost matrix contains NaN or Inf. The message names the cost term."""


def hungarian_assign(cost: torch.Tensor, maximize: bool = False, name: str = "cost") -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment for a ``(N, M)`` cost (or score, with ``maximize``) matrix.

    Returns:
        ``(pred_idx, tgt_idx)``: int64 CPU tensors of length ``min(N, M)``, ``pred_idx`` sorted.
    Raises:
        NonFiniteCostError: the matrix has a NaN or Inf (message names ``name`` and the count).
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be 2-D, got {tuple(cost.shape)}")
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
