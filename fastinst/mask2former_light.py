"""The Mask2Former-light baseline decoder of FastInst's supplement Table I: Mask2Former's
masked-attention decoder on the PPM-FPN features. See :mod:`fastinst.transformer_decoder`."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .attention import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .decoder_base import QueryDecoderBase as _QueryDecoderBase
from .guidance import _repeat_heads, gt_attention_mask

__all__ = ["Mask2FormerLightDecoder"]


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
        criterion: Optional[nn.Module] = None,
    ):
        super().__init__(num_classes, hidden_dim, num_queries, num_aux_queries, nheads, ia_guided_queries,
                         pos_embed, meta_pos_embed_size, local_maximum_first, gt_mask_guided, criterion)
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
                guided.append({"pred_logits": lg, "pred_masks": mg, "pred_matching_indices": indices})
        out["aux_outputs"] = guided + [{"pred_logits": lg, "pred_masks": mg, "pred_matching_indices": None}
                                       for lg, mg in preds[:-1]]
        out["pred_matching_indices"] = None  # official: the last layer is matched again by the criterion
        return out
