"""Transformer building blocks of both FastInst decoders (Mask2Former's layers, whose state-dict
names the official FastInst code keeps): self-attention, cross-attention and FFN layers with
post- or pre-norm, the MLP heads, and Mask2Former's sine positional embedding."""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttentionLayer", "FFNLayer", "MLP", "SelfAttentionLayer", "sine_position_embedding"]


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Multi-head self-attention with residual and LayerNorm (post-norm unless ``normalize_before``).

    ``forward(tgt (B, L, C), attn_mask=None, query_pos=(B or 1, L, C)) -> (B, L, C)``; queries and
    keys get ``query_pos`` added, values do not (DETR convention).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt, attn_mask=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x if query_pos is None else x + query_pos
        out = tgt + self.dropout(self.self_attn(q, q, value=x, attn_mask=attn_mask)[0])
        return out if self.normalize_before else self.norm(out)


class CrossAttentionLayer(nn.Module):
    """Multi-head cross-attention ``tgt -> memory`` with residual and LayerNorm.

    ``forward(tgt (B, L, C), memory (B, S, C), memory_mask=None, pos=None, query_pos=None)``:
    ``memory_mask`` bool ``(B * nhead, L, S)``, True = not attended; ``pos`` is added to the keys,
    ``query_pos`` to the queries. Returns ``(B, L, C)``.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x if query_pos is None else x + query_pos
        k = memory if pos is None else memory + pos
        out = tgt + self.dropout(self.multihead_attn(q, k, value=memory, attn_mask=memory_mask)[0])
        return out if self.normalize_before else self.norm(out)


class FFNLayer(nn.Module):
    """``Linear(d, f) -> ReLU -> Linear(f, d)`` with residual and LayerNorm; ``(B, L, d) -> (B, L, d)``."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        out = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out if self.normalize_before else self.norm(out)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (keys ``layers.<i>``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_embedding(h: int, w: int, dim: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """Mask2Former's normalized sine positional embedding (``PositionEmbeddingSine(dim / 2,
    normalize=True)``, no padding mask) of an ``h x w`` map: ``(1, dim, h, w)`` float32, the first
    ``dim / 2`` channels encode y, the others x.

    Raises:
        ValueError: ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sine positional embedding needs a dim divisible by 4, got {dim}")
    npf = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = (torch.arange(1, h + 1, device=device, dtype=torch.float32) - 0.5) / (h + eps) * scale
    x = (torch.arange(1, w + 1, device=device, dtype=torch.float32) - 0.5) / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(npf, device=device, dtype=torch.float32) // 2) / npf)

    def enc(v):
        p = v[:, None] / dim_t
        return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], dim=2).flatten(1)  # (n, npf)

    py, px = enc(y), enc(x)
    pos = torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)
    return pos.permute(2, 0, 1).unsqueeze(0)
