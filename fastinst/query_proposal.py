"""Instance activation-guided queries (FastInst main paper; supplement A.2, A.3, Tables II-III).

An auxiliary pixel classifier on E4 (3x3 conv, ReLU, 1x1 conv to K + 1 logits) predicts a class
distribution per pixel. Query selection (official ``QueryProposal``, docs/fastinst.md):

1. softmax over the K + 1 classes; each pixel keeps only its most likely *foreground* class
   ``k_i`` (the other planes, background included, are zeroed);
2. local-maximum-first: a pixel whose ``p_{i,k_i}`` is the maximum of its 3x3 neighbourhood in
   class plane ``k_i`` (and >= 1e-6) gets a +1 bonus, so every local maximum ranks before every
   other pixel (supplement A.3);
3. the ``N_a`` pixels with the highest (bonus + foreground probability) give the queries: their
   E4 embeddings, their positional embeddings and their normalized locations.

The classifier is trained with a Hungarian loss (see :class:`fastinst.criterion.FastInstCriterion`)
whose cost includes the location cost. State-dict keys are the official ones
(``conv_proposal_cls_logits.{0,2}``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QueryProposal", "pixel_locations", "select_query_pixels"]


def pixel_locations(h: int, w: int, device=None) -> torch.Tensor:
    """Normalized ``(x, y)`` of an ``h x w`` grid as the official code computes them
    (``linspace(0, 1)`` per axis): ``(h * w, 2)`` float32, row-major."""
    ys = torch.linspace(0, 1, h, device=device)
    xs = torch.linspace(0, 1, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1)


def select_query_pixels(
    probs: torch.Tensor, num_queries: int, local_maximum_first: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Indices of the pixels that become IA-guided queries.

    Args:
        probs: ``(B, K + 1, h, w)`` class probabilities (softmax over dim 1; last = background).
        num_queries: N_a.
        local_maximum_first: rank the 3x3 local maxima of each pixel's best foreground class plane
            first (supplement A.3); otherwise rank by the best foreground probability alone.
        eps: a local maximum must have probability >= eps (official 1e-6).

    Returns:
        int64 ``(B, N_a)`` indices into the flattened ``h * w`` map, best first.

    Raises:
        ValueError: ``h * w < num_queries`` (input too small for N_a queries) or ``probs`` not 4-D.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, K + 1, h, w), got {tuple(probs.shape)}")
    b, c, h, w = probs.shape
    if h * w < num_queries:
        raise ValueError(
            f"E4 has {h}x{w} = {h * w} pixels, fewer than NUM_OBJECT_QUERIES = {num_queries}: "
            "use larger input images (E4 is 1/16 of the padded input) or fewer queries"
        )
    fg = probs[:, :-1]
    best = fg.argmax(dim=1, keepdim=True)  # (B, 1, h, w): k_i
    # keep p_{i, k_i} in plane k_i only (other foreground planes and background zeroed)
    planes = torch.zeros_like(fg).scatter_(1, best, fg.gather(1, best))
    score = planes.amax(dim=1)  # (B, h, w) = p_{i, k_i}
    if local_maximum_first:
        pooled = F.max_pool2d(planes, kernel_size=3, stride=1, padding=1)
        is_max = (planes >= pooled) & (planes >= eps)
        score = score + is_max.any(dim=1).to(score.dtype)
    return score.flatten(1).topk(num_queries, dim=1).indices


class QueryProposal(nn.Module):
    """Auxiliary classifier on E4 and query selection.

    Args:
        in_channels: channels of E4 (= hidden dim 256).
        num_queries: N_a (100).
        num_classes: K (foreground classes; the classifier has K + 1 outputs).
        local_maximum_first: supplement Table III switch.
    """

    def __init__(self, in_channels: int, num_queries: int, num_classes: int, local_maximum_first: bool = True):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.local_maximum_first = local_maximum_first
        self.conv_proposal_cls_logits = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_classes + 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: E4, ``(B, C, h, w)``.
            pos_embed: ``(1 or B, C, h, w)`` positional embeddings of E4's pixels.

        Returns:
            ``features`` ``(B, N_a, C)``, ``pos`` ``(B, N_a, C)``, ``locations`` ``(B, N_a, 2)``
            normalized ``(x, y)`` in [0, 1], ``indices`` int64 ``(B, N_a)`` into ``h * w``, and
            ``logits`` ``(B, K + 1, h, w)`` of the auxiliary classifier.
        """
        b, c, h, w = x.shape
        logits = self.conv_proposal_cls_logits(x)
        with torch.no_grad():
            idx = select_query_pixels(logits.float().softmax(dim=1), self.num_queries, self.local_maximum_first)
        feats = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        pos = pos_embed.flatten(2).transpose(1, 2).expand(b, -1, -1)
        gather = idx.unsqueeze(-1).expand(-1, -1, c)
        locations = pixel_locations(h, w, x.device)[idx]  # (B, N_a, 2)
        return {
            "features": feats.gather(1, gather),
            "pos": pos.gather(1, gather),
            "locations": locations,
            "indices": idx,
            "logits": logits,
        }
