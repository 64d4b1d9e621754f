"""FastInst's dual-path Transformer decoder (main paper; docs/fastinst.md) and the Mask2Former-light baseline
decoder of supplement Table I.

Both take the PPM-FPN outputs ``[E5, E4, E3]`` (strides 32, 16, 8) and return class logits
``(B, N, K + 1)`` and mask logits ``(B, N, H/8, W/8)`` for the N object queries, plus the
per-layer predictions used for deep supervision.

:class:`FastInstDecoder` (Table I "A"; official ``fastinst_decoder.py``, docs/fastinst.md): per layer a
pixel-feature update (E3 pixels attend to the queries, then an FFN) followed by a query update
(masked cross-attention to the pixel features with the previous prediction's masks, self-attention,
FFN); hidden 256, 8 heads, FFN 1024, post-norm. Class (3-layer MLP) and mask-embedding (3-layer MLP)
heads after the initial queries and after every layer, each with its own query LayerNorm and its
own linear projection of the pixel features ("little head change"); masks are the dot products of
mask embeddings and projected pixel features at stride 8.

:class:`Mask2FormerLightDecoder` (Table I baseline): Mask2Former's standard layers (masked
cross-attention on E5, E4, E3 in round robin with a level embedding, self-attention, FFN 2048),
one shared head, mask features = a 1x1 conv of E3 (stride 8, as in the "light" Mask2Former that
uses FastInst's pixel decoder).

Common switches (Table I): IA-guided queries ("B", :mod:`fastinst.query_proposal`) or learnable
queries; ground-truth mask-guided learning ("C"): in training, the last layer's predictions are
matched with the targets, the matched GT masks (nearest-resized) become the attention masks and
every layer is run once more on its own outputs with them (official code), the extra predictions
being supervised with the same matching; learnable positional embeddings (a small learnable map
bilinearly resized to each feature size) and N_b auxiliary learnable queries ("E"), otherwise
Mask2Former's sine positional embeddings and no auxiliary queries. Auxiliary queries take part in
the attention but make no prediction and are never masked.

State-dict keys are the official ones (FastInst) or Mask2Former's (baseline).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .query_proposal import QueryProposal

__all__ = [
    "CrossAttentionLayer",
    "FFNLayer",
    "FastInstDecoder",
    "MLP",
    "Mask2FormerLightDecoder",
    "SelfAttentionLayer",
    "build_transformer_decoder",
    "gt_attention_mask",
    "sine_position_embedding",
]

_Indices = List[Tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- building blocks
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


# ----------------------------------------------------------------------------- shared base
class _QueryDecoderBase(nn.Module):
    """Queries (IA-guided or learnable, plus auxiliary ones), positional embeddings and the
    GT-mask-guidance plumbing shared by both decoders."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_aux_queries: int,
        nheads: int,
        ia_guided_queries: bool,
        pos_embed: str,
        meta_pos_embed_size: int,
        local_maximum_first: bool,
        gt_mask_guided: bool,
    ):
        super().__init__()
        if pos_embed not in ("learnable", "sine"):
            raise ValueError(f"MODEL.FASTINST.POS_EMBED must be 'learnable' or 'sine', got '{pos_embed}'")
        if num_queries < 1 or num_aux_queries < 0:
            raise ValueError(f"need NUM_OBJECT_QUERIES >= 1 and NUM_AUX_QUERIES >= 0, got {num_queries}, {num_aux_queries}")
        if hidden_dim % nheads:
            raise ValueError(f"HIDDEN_DIM {hidden_dim} is not divisible by NHEADS {nheads}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_aux_queries = num_aux_queries
        self.num_heads = nheads
        self.ia_guided_queries = ia_guided_queries
        self.pos_embed_type = pos_embed
        self.gt_mask_guided = gt_mask_guided
        # set by the meta-architecture (official layout): its matcher is needed for GT guidance
        self.criterion: Optional[nn.Module] = None
        if pos_embed == "learnable":
            size = meta_pos_embed_size or int(round(math.sqrt(num_queries)))
            self.meta_pos_embed = nn.Parameter(torch.empty(1, hidden_dim, size, size))
            nn.init.normal_(self.meta_pos_embed, std=0.02)  # official: torch.empty, never initialized
        if num_aux_queries > 0:
            self.empty_query_features = nn.Embedding(num_aux_queries, hidden_dim)
            self.empty_query_pos_embed = nn.Embedding(num_aux_queries, hidden_dim)
        if ia_guided_queries:
            self.query_proposal = QueryProposal(hidden_dim, num_queries, num_classes, local_maximum_first)
        else:
            self.query_feat = nn.Embedding(num_queries, hidden_dim)
            self.query_embed = nn.Embedding(num_queries, hidden_dim)

    def _pos_map(self, feat: torch.Tensor) -> torch.Tensor:
        """``(1, C, h, w)`` positional embedding for a ``(B, C, h, w)`` feature map."""
        h, w = feat.shape[-2:]
        if self.pos_embed_type == "learnable":
            return F.interpolate(self.meta_pos_embed, size=(h, w), mode="bilinear", align_corners=False).to(feat.dtype)
        return sine_position_embedding(h, w, self.hidden_dim, feat.device).to(feat.dtype)

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)

    def _initial_queries(self, e4: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        b = e4.shape[0]
        if self.ia_guided_queries:
            prop = self.query_proposal(e4, self._pos_map(e4))
            q, qpos = prop["features"], prop["pos"]
            locations, logits = prop["locations"], prop["logits"]
        else:
            q = self.query_feat.weight[None].expand(b, -1, -1).to(e4.dtype)
            qpos = self.query_embed.weight[None].expand(b, -1, -1).to(e4.dtype)
            locations = logits = None
        if self.num_aux_queries > 0:
            q = torch.cat([q, self.empty_query_features.weight[None].expand(b, -1, -1).to(q.dtype)], dim=1)
            qpos = torch.cat([qpos, self.empty_query_pos_embed.weight[None].expand(b, -1, -1).to(q.dtype)], dim=1)
        return {"query": q, "query_pos": qpos, "locations": locations, "proposal_logits": logits}

    def _attn_mask_from_prediction(self, mask_logits: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Predicted masks ``(B, N, h, w)`` -> bool ``(B * nheads, N + N_b, h' * w')``: pixels whose
        mask logit is < 0 (sigmoid < 0.5) are hidden; auxiliary queries are never masked."""
        m = mask_logits.detach()
        if size is not None and tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        blocked = (m < 0).flatten(2)
        if self.num_aux_queries:
            blocked = F.pad(blocked, (0, 0, 0, self.num_aux_queries), value=False)
        return _repeat_heads(_unblock_empty_rows(blocked), self.num_heads)

    def _match_for_guidance(self, pred_logits, pred_masks, targets, locations) -> _Indices:
        if self.criterion is None or not hasattr(self.criterion, "matcher"):
            raise RuntimeError(
                "GT-mask-guided learning needs the criterion's matcher: set decoder.criterion "
                "(the FastInst meta-architecture does) or MODEL.FASTINST.GT_MASK_GUIDED False"
            )
        return self.criterion.matcher(pred_logits.detach(), pred_masks.detach(), targets, locations)

    def _guided(self, targets) -> bool:
        return self.training and self.gt_mask_guided and targets is not None


# ----------------------------------------------------------------------------- FastInst (A)
class FastInstDecoder(_QueryDecoderBase):
    """Dual-path Transformer decoder (see the module docstring).

    Args:
        num_classes: K.
        hidden_dim: 256. nheads: 8. dim_feedforward: 1024. dec_layers: D (1 or 3).
        num_queries: N_a (100). num_aux_queries: N_b (8; 0 without "E").
        mask_dim: mask-embedding dimension (256).
        pre_norm, dropout: official False and 0.0.
        ia_guided_queries, gt_mask_guided, pos_embed ("learnable" | "sine"),
        meta_pos_embed_size (0 = round(sqrt(N_a))), local_maximum_first: Table I-III switches.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_aux_queries: int = 8,
        nheads: int = 8,
        dim_feedforward: int = 1024,
        dec_layers: int = 3,
        mask_dim: int = 256,
        pre_norm: bool = False,
        dropout: float = 0.0,
        ia_guided_queries: bool = True,
        gt_mask_guided: bool = True,
        pos_embed: str = "learnable",
        meta_pos_embed_size: int = 0,
        local_maximum_first: bool = True,
    ):
        super().__init__(num_classes, hidden_dim, num_queries, num_aux_queries, nheads, ia_guided_queries,
                         pos_embed, meta_pos_embed_size, local_maximum_first, gt_mask_guided)
        if dec_layers < 1:
            raise ValueError(f"DEC_LAYERS must be >= 1, got {dec_layers}")
        self.num_layers = dec_layers
        args = dict(d_model=hidden_dim, dropout=dropout, normalize_before=pre_norm)
        self.transformer_query_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(nhead=nheads, **args) for _ in range(dec_layers))
        self.transformer_query_self_attention_layers = nn.ModuleList(SelfAttentionLayer(nhead=nheads, **args) for _ in range(dec_layers))
        self.transformer_query_ffn_layers = nn.ModuleList(FFNLayer(dim_feedforward=dim_feedforward, **args) for _ in range(dec_layers))
        self.transformer_mask_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(nhead=nheads, **args) for _ in range(dec_layers))
        self.transformer_mask_ffn_layers = nn.ModuleList(FFNLayer(dim_feedforward=dim_feedforward, **args) for _ in range(dec_layers))
        n_heads = dec_layers + 1  # after the initial queries and after every layer
        self.decoder_query_norm_layers = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(n_heads))
        self.class_embed_layers = nn.ModuleList(MLP(hidden_dim, hidden_dim, num_classes + 1, 3) for _ in range(n_heads))
        self.mask_embed_layers = nn.ModuleList(MLP(hidden_dim, hidden_dim, mask_dim, 3) for _ in range(n_heads))
        self.mask_features_layers = nn.ModuleList(nn.Linear(hidden_dim, mask_dim) for _ in range(n_heads))

    def _layer(self, i, q, pixel, qpos, ppos, attn_mask):
        # pixel-feature update: pixels attend to the queries, then FFN
        pixel = self.transformer_mask_cross_attention_layers[i](pixel, q, query_pos=ppos, pos=qpos)
        pixel = self.transformer_mask_ffn_layers[i](pixel)
        # query update: masked cross-attention to the pixels, self-attention, FFN
        q = self.transformer_query_cross_attention_layers[i](q, pixel, memory_mask=attn_mask, query_pos=qpos, pos=ppos)
        q = self.transformer_query_self_attention_layers[i](q, query_pos=qpos)
        q = self.transformer_query_ffn_layers[i](q)
        return q, pixel

    def _heads(self, j: int, q, pixel, size, with_class: bool = True):
        qn = self.decoder_query_norm_layers[j](q[:, : self.num_queries])
        logits = self.class_embed_layers[j](qn) if with_class else None
        emb = self.mask_embed_layers[j](qn)
        feats = self.mask_features_layers[j](pixel)
        masks = torch.einsum("bqc,blc->bql", emb, feats).reshape(q.shape[0], self.num_queries, *size)
        return logits, masks

    def forward(self, features: Sequence[torch.Tensor], targets: Optional[Sequence[Dict]] = None) -> Dict:
        """
        Args:
            features: ``[E5, E4, E3]``, ``(B, C, H/32, W/32)``, ``(B, C, H/16, W/16)``, ``(B, C, H/8, W/8)``.
            targets: training only, for GT-mask guidance: per image ``"labels"`` int64 ``(M,)`` and
                ``"masks"`` bool ``(M, Hp, Wp)`` at the padded input size.

        Returns:
            ``pred_logits`` ``(B, N_a, K + 1)``, ``pred_masks`` ``(B, N_a, H/8, W/8)``;
            ``proposal_logits`` ``(B, K + 1, H/16, W/16)`` and ``query_locations`` ``(B, N_a, 2)``
            (None with learnable queries); in training also ``aux_outputs`` (the GT-guided
            predictions of the D layers, then the initial and first D - 1 layers' predictions;
            guided ones carry their ``indices``) and ``matching_indices`` of the last layer.
        """
        e4, e3 = features[1], features[2]
        size = tuple(e3.shape[-2:])
        pixel = self._flat(e3)
        ppos = self._flat(self._pos_map(e3))
        init = self._initial_queries(e4)
        q, qpos = init["query"], init["query_pos"]

        train = self.training
        logits, masks = self._heads(0, q, pixel, size, with_class=train)
        attn = self._attn_mask_from_prediction(masks)
        preds = [(logits, masks)]
        memory = [(q, pixel)]
        for i in range(self.num_layers):
            q, pixel = self._layer(i, q, pixel, qpos, ppos, attn)
            memory.append((q, pixel))
            last = i == self.num_layers - 1
            logits, masks = self._heads(i + 1, q, pixel, size, with_class=train or last)
            preds.append((logits, masks))
            if not last:
                attn = self._attn_mask_from_prediction(masks)

        out = {
            "pred_logits": preds[-1][0],
            "pred_masks": preds[-1][1],
            "proposal_logits": init["proposal_logits"],
            "query_locations": init["locations"],
        }
        if not train:
            return out
        guided: List[Dict] = []
        indices = None
        if self._guided(targets):
            indices = self._match_for_guidance(preds[-1][0], preds[-1][1], targets, init["locations"])
            gt_mask = gt_attention_mask(indices, targets, size, self.num_queries + self.num_aux_queries)
            gt_mask = _repeat_heads(gt_mask, self.num_heads)
            for i in range(self.num_layers):
                qg, pg = self._layer(i, memory[i + 1][0], memory[i + 1][1], qpos, ppos, gt_mask)
                lg, mg = self._heads(i + 1, qg, pg, size)
                guided.append({"pred_logits": lg, "pred_masks": mg, "indices": indices})
        out["aux_outputs"] = guided + [{"pred_logits": lg, "pred_masks": mg} for lg, mg in preds[:-1]]
        out["matching_indices"] = indices
        return out


# ----------------------------------------------------------------------------- Mask2Former-light
class Mask2FormerLightDecoder(_QueryDecoderBase):
    """Mask2Former's masked-attention decoder on PPM-FPN features (supplement Table I baseline).

    Args as :class:`FastInstDecoder`; Mask2Former's defaults for the baseline are ``dec_layers=9``,
    ``dim_feedforward=2048``, learnable queries, sine positional embeddings, no auxiliary queries.
    """

    num_levels = 3

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_aux_queries: int = 0,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        pre_norm: bool = False,
        dropout: float = 0.0,
        ia_guided_queries: bool = False,
        gt_mask_guided: bool = False,
        pos_embed: str = "sine",
        meta_pos_embed_size: int = 0,
        local_maximum_first: bool = True,
    ):
        super().__init__(num_classes, hidden_dim, num_queries, num_aux_queries, nheads, ia_guided_queries,
                         pos_embed, meta_pos_embed_size, local_maximum_first, gt_mask_guided)
        if dec_layers < 1:
            raise ValueError(f"DEC_LAYERS must be >= 1, got {dec_layers}")
        self.num_layers = dec_layers
        args = dict(d_model=hidden_dim, dropout=dropout, normalize_before=pre_norm)
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(nhead=nheads, **args) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(nhead=nheads, **args) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(dim_feedforward=dim_feedforward, **args) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)  # Detectron2 c2_xavier_fill
        nn.init.zeros_(self.mask_features.bias)

    def _layer(self, i, q, src, qpos, pos, attn_mask):
        q = self.transformer_cross_attention_layers[i](q, src, memory_mask=attn_mask, pos=pos, query_pos=qpos)
        q = self.transformer_self_attention_layers[i](q, query_pos=qpos)
        return self.transformer_ffn_layers[i](q)

    def _heads(self, q, mask_features):
        qn = self.decoder_norm(q[:, : self.num_queries])
        return self.class_embed(qn), torch.einsum("bqc,bchw->bqhw", self.mask_embed(qn), mask_features)

    def forward(self, features: Sequence[torch.Tensor], targets: Optional[Sequence[Dict]] = None) -> Dict:
        """Same inputs and outputs as :meth:`FastInstDecoder.forward`; layer ``i`` attends to
        level ``i % 3`` of ``[E5, E4, E3]``."""
        srcs, pos, sizes = [], [], []
        for lvl, f in enumerate(features[: self.num_levels]):
            sizes.append(tuple(f.shape[-2:]))
            pos.append(self._flat(self._pos_map(f)))
            srcs.append(self._flat(f) + self.level_embed.weight[lvl].to(f.dtype))
        mask_features = self.mask_features(features[2])
        init = self._initial_queries(features[1])
        q, qpos = init["query"], init["query_pos"]

        logits, masks = self._heads(q, mask_features)
        attn = self._attn_mask_from_prediction(masks, sizes[0])
        preds = [(logits, masks)]
        memory = [q]
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            q = self._layer(i, q, srcs[lvl], qpos, pos[lvl], attn)
            memory.append(q)
            logits, masks = self._heads(q, mask_features)
            preds.append((logits, masks))
            attn = self._attn_mask_from_prediction(masks, sizes[(i + 1) % self.num_levels])

        out = {
            "pred_logits": preds[-1][0],
            "pred_masks": preds[-1][1],
            "proposal_logits": init["proposal_logits"],
            "query_locations": init["locations"],
        }
        if not self.training:
            return out
        guided: List[Dict] = []
        indices = None
        if self._guided(targets):
            indices = self._match_for_guidance(preds[-1][0], preds[-1][1], targets, init["locations"])
            total = self.num_queries + self.num_aux_queries
            gt_masks = [_repeat_heads(gt_attention_mask(indices, targets, s, total), self.num_heads) for s in sizes]
            for i in range(self.num_layers):
                lvl = i % self.num_levels
                qg = self._layer(i, memory[i + 1], srcs[lvl], qpos, pos[lvl], gt_masks[lvl])
                lg, mg = self._heads(qg, mask_features)
                guided.append({"pred_logits": lg, "pred_masks": mg, "indices": indices})
        out["aux_outputs"] = guided + [{"pred_logits": lg, "pred_masks": mg} for lg, mg in preds[:-1]]
        out["matching_indices"] = indices
        return out


def build_transformer_decoder(cfg) -> _QueryDecoderBase:
    """:class:`FastInstDecoder` (``MODEL.FASTINST.DUAL_PATH``) or :class:`Mask2FormerLightDecoder`."""
    fi = cfg.MODEL.FASTINST
    if cfg.MODEL.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.NUM_CLASSES must be >= 1 when building FastInst, got {cfg.MODEL.NUM_CLASSES}")
    cls = FastInstDecoder if fi.DUAL_PATH else Mask2FormerLightDecoder
    return cls(
        num_classes=cfg.MODEL.NUM_CLASSES,
        hidden_dim=fi.HIDDEN_DIM,
        num_queries=fi.NUM_OBJECT_QUERIES,
        num_aux_queries=fi.NUM_AUX_QUERIES,
        nheads=fi.NHEADS,
        dim_feedforward=fi.DIM_FEEDFORWARD,
        dec_layers=fi.DEC_LAYERS,
        mask_dim=fi.MASK_DIM,
        pre_norm=fi.PRE_NORM,
        dropout=fi.DROPOUT,
        ia_guided_queries=fi.IA_GUIDED_QUERIES,
        gt_mask_guided=fi.GT_MASK_GUIDED,
        pos_embed=fi.POS_EMBED,
        meta_pos_embed_size=fi.META_POS_EMBED_SIZE,
        local_maximum_first=fi.LOCAL_MAXIMUM_FIRST,
    )
