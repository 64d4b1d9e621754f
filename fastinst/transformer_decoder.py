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

from .attention import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, sine_position_embedding
from .decoder_base import QueryDecoderBase
from .dual_path_decoder import FastInstDecoder
from .guidance import gt_attention_mask
from .mask2former_light import Mask2FormerLightDecoder

__all__ = [
    "CrossAttentionLayer",
    "FFNLayer",
    "FastInstDecoder",
    "MLP",
    "Mask2FormerLightDecoder",
    "QueryDecoderBase",
    "SelfAttentionLayer",
    "build_transformer_decoder",
    "gt_attention_mask",
    "sine_position_embedding",
]


def build_transformer_decoder(cfg, criterion=None) -> QueryDecoderBase:
    """:class:`FastInstDecoder` (``MODEL.FASTINST.DUAL_PATH``) or :class:`Mask2FormerLightDecoder`,
    holding ``criterion`` for GT-mask-guided learning."""
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
        criterion=criterion,
    )
