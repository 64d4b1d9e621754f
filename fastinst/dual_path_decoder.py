"""FastInst's dual-path Transformer decoder (main paper; supplement Table I "A"; official
``fastinst_decoder.py``, docs/fastinst.md). See :mod:`fastinst.transformer_decoder` for what both
decoders take and return."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .attention import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .decoder_base import QueryDecoderBase as _QueryDecoderBase
from .guidance import _repeat_heads, gt_attention_mask

__all__ = ["FastInstDecoder"]


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
        criterion: the criterion whose matcher GT-mask-guided learning uses (see
            :class:`fastinst.decoder_base.QueryDecoderBase`).
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
        criterion: Optional[nn.Module] = None,
    ):
        super().__init__(num_classes, hidden_dim, num_queries, num_aux_queries, nheads, ia_guided_queries,
                         pos_embed, meta_pos_embed_size, local_maximum_first, gt_mask_guided, criterion)
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
            predictions of the D layers, then the initial and first D - 1 layers' predictions)
            and ``pred_matching_indices`` (official name) on the final output and on every
            auxiliary one: the matching computed here for GT-mask guidance on the guided
            outputs, ``None`` on all the others, the final (last layer's) output included, which
            the criterion therefore matches again (official ``fastinst_decoder.py``).
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
                guided.append({"pred_logits": lg, "pred_masks": mg, "pred_matching_indices": indices})
        out["aux_outputs"] = guided + [{"pred_logits": lg, "pred_masks": mg, "pred_matching_indices": None}
                                       for lg, mg in preds[:-1]]
        out["pred_matching_indices"] = None  # official: the last layer is matched again by the criterion
        return out


