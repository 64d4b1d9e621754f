"""The box branch of one QueryInst stage: the dynamic instance interactive head (DIIHead of
Sparse R-CNN) and the box-delta coding.

Poster / paper Eq. (1):

    x_t^box            <- P^box(x^FPN, b_{t-1})           RoIAlign 7x7 (``pooler.py``)
    q*_{t-1}           <- MSA_t(q_{t-1})                   :class:`QueryMSA`
    x_t^box*, q_t      <- DynConv_t^box(x_t^box, q*_{t-1})  :class:`~queryinst.dynamic_conv.DynConv`
    b_t                <- B_t(x_t^box*)                     class and box-delta FCs

Details from the official code (docs/queryinst.md; hustvl/QueryInst ``dii_head.py``, mmcv's
``MultiheadAttention``/``FFN``): 8-head self-attention with a residual connection and LayerNorm;
``q + DynConv(q*)`` then LayerNorm; FFN 256 -> 2048 -> 256 with a residual and LayerNorm; one
class FC (Linear without bias + LN + ReLU) and three regression FCs before the class/delta
outputs; Xavier-uniform init of every weight matrix, class bias at prior 0.01, regression bias 0.
Deltas are decoded with mmdetection's ``DeltaXYWHBBoxCoder`` (means 0, stds (0.5, 0.5, 1, 1),
width/height log-ratio clamped at log(1000/16); ``clip_border=False`` in the official configs).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .dynamic_conv import DynConv

__all__ = ["DIIHead", "QueryMSA", "decode_box_deltas", "encode_box_deltas", "DEFAULT_SCALE_CLAMP"]

#: mmdetection's ``wh_ratio_clip = 16 / 1000``: log-ratios of width/height are clamped to +-4.135.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def decode_box_deltas(
    boxes: torch.Tensor,
    deltas: torch.Tensor,
    stds: Sequence[float] = (0.5, 0.5, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
    clip_size: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply ``(dx, dy, dw, dh)`` deltas to xyxy boxes (mmdetection ``DeltaXYWHBBoxCoder``, means 0).

    ``cx' = cx + w * dx * std_x``, ``w' = w * exp(clamp(dw * std_w, +-scale_clamp))`` (same for y, h).

    Args:
        boxes: ``(R, 4)`` xyxy pixels.
        deltas: ``(R, 4)`` raw outputs of the regression FC.
        stds: the coder's ``target_stds``.
        scale_clamp: bound of the width/height log-ratio.
        clip_size: optional ``(R, 2)`` ``(height, width)`` of each box's image: x is clamped to
            ``[0, width]`` and y to ``[0, height]`` (``CLIP_BOXES``).
    Returns:
        ``(R, 4)`` xyxy pixels, float32 (computed in float32 also under AMP: half precision would
        round pixel coordinates of large images).
    Raises:
        ValueError: shapes are not ``(R, 4)`` / ``(R, 2)``.
    """
    if boxes.shape != deltas.shape or boxes.shape[-1] != 4:
        raise ValueError(f"boxes and deltas must both be (R, 4), got {tuple(boxes.shape)} and {tuple(deltas.shape)}")
    boxes, deltas = boxes.float(), deltas.float()
    d = deltas * deltas.new_tensor(stds)
    dw = d[:, 2].clamp(-scale_clamp, scale_clamp)
    dh = d[:, 3].clamp(-scale_clamp, scale_clamp)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w + w * d[:, 0]
    cy = boxes[:, 1] + 0.5 * h + h * d[:, 1]
    w, h = w * dw.exp(), h * dh.exp()
    out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)
    if clip_size is not None:
        if clip_size.shape != (boxes.shape[0], 2):
            raise ValueError(f"clip_size must be ({boxes.shape[0]}, 2) (height, width), got {tuple(clip_size.shape)}")
        hw = clip_size.to(out.dtype)
        upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)
        out = torch.minimum(out.clamp(min=0), upper)
    return out


def encode_box_deltas(
    boxes: torch.Tensor, targets: torch.Tensor, stds: Sequence[float] = (0.5, 0.5, 1.0, 1.0)
) -> torch.Tensor:
    """Inverse of :func:`decode_box_deltas` (without clamping/clipping): the deltas that move
    ``boxes`` ``(R, 4)`` onto ``targets`` ``(R, 4)`` (both xyxy with positive sizes)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    dx = ((targets[:, 0] + 0.5 * tw) - (boxes[:, 0] + 0.5 * w)) / w
    dy = ((targets[:, 1] + 0.5 * th) - (boxes[:, 1] + 0.5 * h)) / h
    d = torch.stack([dx, dy, (tw / w).log(), (th / h).log()], dim=1)
    return d / d.new_tensor(stds)


class QueryMSA(nn.Module):
    """``q* = LN(q + MSA(q))``: multi-head self-attention among the queries of one image (poster
    Eq. (1), ``MSA_t``), with the residual and LayerNorm of the official code.

    Shapes: ``(B, N, C)`` -> ``(B, N, C)``. Attention never mixes images of a batch.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.dim() != 3:
            raise ValueError(f"QueryMSA expects (B, N, C) queries, got {tuple(q.shape)}")
        out = self.attn(q, q, q, need_weights=False)[0]
        return self.norm(q + self.dropout(out))


def _fc_ln_relu(dim: int) -> list:
    return [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]


class DIIHead(nn.Module):
    """Box head of one stage: ``MSA -> DynConv^box -> FFN -> class / box-delta FCs``.

    Args:
        num_classes: K (sigmoid classification, no background logit).
        dim: query / RoI channels C (256).
        num_heads: heads of the self-attention (8).
        dim_feedforward: hidden width of the FFN (2048).
        dropout: dropout of attention, DynConv residual and FFN (0.0).
        dynamic_dim: D of :class:`DynConv` (64).
        pooler_resolution: S of the box RoI feature (7).
        num_cls_fcs, num_reg_fcs: FCs before the class (1) and delta (3) outputs.
        prior_prob: initial foreground probability of the class bias (0.01).

    Forward:
        roi_feats: ``(B*N, C, S, S)`` RoI features of the current boxes (image-major order).
        queries: ``(B, N, C)`` proposal features ``q_{t-1}``.
        returns a dict: ``"logits"`` ``(B, N, K)``, ``"deltas"`` ``(B, N, 4)``, ``"queries"``
        ``(B, N, C)`` (``q_t``, input of the next stage) and ``"queries_msa"`` ``(B, N, C)``
        (``q*_{t-1}``, the query after the self-attention, which drives ``DynConv^mask``).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.dim = num_classes, dim
        self.attention = QueryMSA(dim, num_heads, dropout)
        self.dynconv = DynConv(dim, dynamic_dim, dim, pooler_resolution, with_proj=True)
        self.dynconv_dropout = nn.Dropout(dropout)
        self.dynconv_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(dim_feedforward, dim), nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(dim)
        self.cls_fcs = nn.Sequential(*[m for _ in range(num_cls_fcs) for m in _fc_ln_relu(dim)])
        self.reg_fcs = nn.Sequential(*[m for _ in range(num_reg_fcs) for m in _fc_ln_relu(dim)])
        self.fc_cls = nn.Linear(dim, num_classes)
        self.fc_reg = nn.Linear(dim, 4)
        self.prior_prob = prior_prob
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``DIIHead.init_weights``: Xavier-uniform on every weight matrix, class bias
        ``-log((1 - p) / p)``, regression bias 0. The zero comes from ``BBoxHead``'s ``init_cfg``
        ``Normal(std=0.001, override fc_reg)`` (mmengine/mmcv ``NormalInit``: bias 0), which
        ``DIIHead.init_weights`` runs first (``super().init_weights()``) before the Xavier pass
        re-draws the weight; the other biases and the LayerNorms keep PyTorch's defaults."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: torch.Tensor, queries: torch.Tensor) -> Dict[str, torch.Tensor]:
        b, n, c = queries.shape
        q_star = self.attention(queries)
        q = q_star.reshape(b * n, c)
        q = self.dynconv_norm(q + self.dynconv_dropout(self.dynconv(q, roi_feats)))
        q = self.ffn_norm(q + self.ffn(q))
        logits = self.fc_cls(self.cls_fcs(q)).view(b, n, -1)
        deltas = self.fc_reg(self.reg_fcs(q)).view(b, n, 4)
        return {"logits": logits, "deltas": deltas, "queries": q.view(b, n, c), "queries_msa": q_star}
