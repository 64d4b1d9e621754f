"""Attention masks of FastInst's decoders: the predicted-mask attention of masked cross-attention
and the ground-truth masks of GT-mask-guided learning (supplement Table I "C"; official code)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["gt_attention_mask"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]
_Indices = Indices


def _repeat_heads(mask: torch.Tensor, nheads: int) -> torch.Tensor:
    """bool ``(B, L, S)`` -> ``(B * nheads, L, S)`` (batch-major, as nn.MultiheadAttention expects)."""
    return mask.repeat_interleave(nheads, dim=0)


def _unblock_empty_rows(blocked: torch.Tensor) -> torch.Tensor:
    """A query whose mask hides every pixel attends everywhere instead (Mask2Former/FastInst)."""
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def gt_attention_mask(
    indices: _Indices, targets: Sequence[Dict[str, torch.Tensor]], size: Tuple[int, int], num_total_queries: int
) -> torch.Tensor:
    """Attention masks of ground-truth mask-guided learning (Table I "C").

    Args:
        indices: per image ``(query_idx, target_idx)`` from the matcher.
        targets: per image ``"masks"`` ``(M, Hp, Wp)`` (bool or float) at the padded input size.
        size: ``(h, w)`` of the attended feature map; masks are nearest-resized to it.
        num_total_queries: N_a + N_b.

    Returns:
        bool ``(B, num_total_queries, h * w)``, True = not attended: a matched query sees only its
        GT mask; unmatched and auxiliary queries, and queries whose resized GT mask is empty,
        attend everywhere.
    """
    b = len(targets)
    h, w = size
    device = targets[0]["masks"].device if b else None
    out = torch.zeros((b, num_total_queries, h * w), dtype=torch.bool, device=device)
    for i, ((src, tgt), t) in enumerate(zip(indices, targets)):
        if src.numel() == 0:
            continue
        m = F.interpolate(t["masks"][tgt.to(t["masks"].device)].float()[None], size=(h, w), mode="nearest")[0]
        out[i, src.to(out.device)] = ~(m > 0.5).flatten(1)
    return _unblock_empty_rows(out)
