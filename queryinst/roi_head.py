"""The query-based multi-stage head of QueryInst: learnable proposals, S stages of
``DIIHead`` (box) + ``DynamicMaskHead`` (mask), and the query/MSA wiring of poster Table 6.

Per stage ``t = 1..S`` (poster Eq. (1) and paper Eq. (3)):

    x_t^box      <- RoIAlign7x7(FPN, b_{t-1})            (boxes of the previous stage, detached)
    q*_{t-1}     <- MSA_t(q_{t-1})
    q_t, logits_t, deltas_t <- DynConv^box, FFN, FCs
    b_t          <- decode(b_{t-1}, deltas_t)
    x_t^mask     <- RoIAlign14x14(FPN, b_t)              (the stage's own refined boxes)
    m_t          <- M_t(DynConv_t^mask(x_t^mask, q^mask*_{t-1}))

``q^mask*_{t-1}`` depends on the Table 6 switches (Fig. 5; our reading of the figure, since the
poster's text has only the table):

- shared query + shared MSA (default, Fig. 5(d)): ``q^mask* = q*_{t-1}``, the box branch's
  query after its MSA (the official code's ``attn_feats``).
- shared query, separate MSA: ``q^mask* = MSA_t^mask(q_{t-1})`` with a second MSA per stage.
- separate query: the mask branch has its own learnable queries ``u_0`` (N x C) that are updated
  only by attention, ``u_t = MSA(u_{t-1})`` with the box branch's ``MSA_t`` (shared MSA) or its
  own ``MSA_t^mask``; ``q^mask* = u_t``.

The initial proposals follow mmdetection's ``EmbeddingRPNHead``: N learnable boxes stored as
normalized ``(cx, cy, w, h)`` initialized to the whole image ``(0.5, 0.5, 1, 1)`` and N learnable
C-dim features (``nn.Embedding``, N(0, 1) init), scaled to each image's unpadded size.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

from .box_head import DEFAULT_SCALE_CLAMP, DIIHead, QueryMSA, decode_box_deltas
from .mask_head import DynamicMaskHead
from .pooler import RoIPooler

__all__ = ["QueryRoIHead"]


class QueryRoIHead(nn.Module):
    """Learnable proposals and the S box/mask stages (see the module docstring).

    Args:
        num_classes: K.
        strides: strides of the FPN maps given to :meth:`forward_boxes` (``(4, 8, 16, 32)``).
        num_proposals: N (100 or 300).
        dim: C (256).
        num_stages: S (6; 5 for the poster's 5-stage row).
        num_heads, dim_feedforward, dropout, dynamic_dim, num_cls_fcs, num_reg_fcs, prior_prob:
            see :class:`~queryinst.box_head.DIIHead`.
        box_resolution, mask_resolution: RoIAlign sizes (7, 14).
        sampling_ratio, finest_scale: see :class:`~queryinst.pooler.RoIPooler` (2, 56).
        delta_stds, scale_clamp, clip_boxes: box-delta decoding (``(0.5, 0.5, 1, 1)``,
            log(1000/16), False = official ``clip_border=False``).
        mask_num_convs, mask_conv_dim, mask_norm: see :class:`~queryinst.mask_head.DynamicMaskHead`.
        use_dynamic_conv, mask_flow: Table 4 switches.
        shared_query, shared_msa: Table 6 switches.

    Raises:
        ValueError: ``num_stages < 1``, ``num_proposals < 1`` or ``len(strides) == 0``.
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        num_proposals: int = 100,
        dim: int = 256,
        num_stages: int = 6,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        dynamic_dim: int = 64,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        prior_prob: float = 0.01,
        box_resolution: int = 7,
        mask_resolution: int = 14,
        sampling_ratio: int = 2,
        finest_scale: float = 56.0,
        delta_stds: Sequence[float] = (0.5, 0.5, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
        clip_boxes: bool = False,
        mask_num_convs: int = 4,
        mask_conv_dim: int = 256,
        mask_norm: str = "BN",
        use_dynamic_conv: bool = True,
        mask_flow: bool = False,
        shared_query: bool = True,
        shared_msa: bool = True,
    ):
        super().__init__()
        if num_stages < 1 or num_proposals < 1 or not strides:
            raise ValueError(f"need num_stages >= 1, num_proposals >= 1 and strides; got {num_stages}, {num_proposals}, {strides}")
        self.num_classes, self.num_proposals, self.dim, self.num_stages = num_classes, num_proposals, dim, num_stages
        self.delta_stds, self.scale_clamp, self.clip_boxes = tuple(float(s) for s in delta_stds), float(scale_clamp), clip_boxes
        self.use_dynamic_conv, self.mask_flow = use_dynamic_conv, mask_flow
        self.shared_query, self.shared_msa = shared_query, shared_msa

        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)
        self.init_proposal_features = nn.Embedding(num_proposals, dim)
        with torch.no_grad():
            self.init_proposal_boxes.weight[:, :2] = 0.5
            self.init_proposal_boxes.weight[:, 2:] = 1.0
        # Table 6, separate query: the mask branch's own learnable queries
        self.init_mask_queries = None if shared_query else nn.Embedding(num_proposals, dim)

        self.box_pooler = RoIPooler(box_resolution, strides, sampling_ratio, finest_scale)
        self.mask_pooler = RoIPooler(mask_resolution, strides, sampling_ratio, finest_scale)
        self.box_heads = nn.ModuleList(
            DIIHead(num_classes, dim, num_heads, dim_feedforward, dropout, dynamic_dim, box_resolution,
                    num_cls_fcs, num_reg_fcs, prior_prob)
            for _ in range(num_stages)
        )
        self.mask_heads = nn.ModuleList(
            DynamicMaskHead(num_classes, dim, dynamic_dim, mask_resolution, mask_num_convs, mask_conv_dim, mask_norm,
                            use_dynamic_conv, mask_flow=mask_flow and t > 0)
            for t in range(num_stages)
        )
        # Table 6, separate MSA: one more self-attention per stage for the mask branch
        self.mask_attentions = (
            None if shared_msa else nn.ModuleList(QueryMSA(dim, num_heads, dropout) for _ in range(num_stages))
        )

    @classmethod
    def from_config(cls, cfg, strides: Sequence[int]) -> "QueryRoIHead":
        """``MODEL.NUM_CLASSES`` (the one place the class count is read) and ``MODEL.QUERY_INST``."""
        q = cfg.MODEL.QUERY_INST
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            strides=strides,
            num_proposals=q.NUM_PROPOSALS,
            dim=q.HIDDEN_DIM,
            num_stages=q.NUM_STAGES,
            num_heads=q.NUM_HEADS,
            dim_feedforward=q.DIM_FEEDFORWARD,
            dropout=q.DROPOUT,
            dynamic_dim=q.DYNAMIC_DIM,
            num_cls_fcs=q.NUM_CLS_FCS,
            num_reg_fcs=q.NUM_REG_FCS,
            prior_prob=q.PRIOR_PROB,
            box_resolution=q.BOX_POOLER_RESOLUTION,
            mask_resolution=q.MASK_POOLER_RESOLUTION,
            sampling_ratio=q.POOLER_SAMPLING_RATIO,
            finest_scale=q.POOLER_FINEST_SCALE,
            delta_stds=q.BOX_DELTA_STDS,
            scale_clamp=q.BOX_SCALE_CLAMP,
            clip_boxes=q.CLIP_BOXES,
            mask_num_convs=q.MASK_HEAD.NUM_CONVS,
            mask_conv_dim=q.MASK_HEAD.CONV_DIM,
            mask_norm=q.MASK_HEAD.NORM,
            use_dynamic_conv=q.MASK_HEAD.DYNAMIC_CONV,
            mask_flow=q.MASK_HEAD.MASK_FLOW,
            shared_query=q.SHARED_QUERY,
            shared_msa=q.SHARED_MSA,
        )

    # ------------------------------------------------------------------ proposals and boxes
    def initial_proposals(self, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``image_sizes`` ``(B, 2)`` unpadded ``(h, w)`` -> boxes ``(B, N, 4)`` xyxy pixels and
        queries ``(B, N, C)``."""
        wh = image_sizes.flip(-1).to(self.init_proposal_boxes.weight.dtype)
        whwh = torch.cat([wh, wh], dim=-1)[:, None, :]  # (B, 1, 4)
        boxes = box_convert(self.init_proposal_boxes.weight, "cxcywh", "xyxy")[None] * whwh
        b = image_sizes.shape[0]
        queries = self.init_proposal_features.weight[None].expand(b, -1, -1)
        return boxes, queries

    def forward_boxes(self, features: List[torch.Tensor], image_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Run the S box stages.

        Args:
            features: FPN maps ``(B, C, H/s, W/s)`` for the pooler's strides.
            image_sizes: ``(B, 2)`` int64 unpadded ``(h, w)`` of every image (input pixels).
        Returns:
            one dict per stage: ``"logits"`` ``(B, N, K)``, ``"boxes"`` ``(B, N, 4)`` xyxy pixels
            (``b_t``, differentiable w.r.t. this stage's deltas), ``"mask_queries"`` ``(B, N, C)``
            (the query that drives this stage's ``DynConv^mask``).
        """
        boxes, queries = self.initial_proposals(image_sizes)
        b, n = boxes.shape[:2]
        clip = image_sizes.repeat_interleave(n, dim=0) if self.clip_boxes else None
        mask_q = None if self.shared_query else self.init_mask_queries.weight[None].expand(b, -1, -1)
        outputs = []
        for t, head in enumerate(self.box_heads):
            # RoIAlign has no gradient w.r.t. boxes; the decoding below does, so the learnable
            # initial boxes are trained through the first stage (later inputs are detached).
            roi_feats = self.box_pooler(features, list(boxes.detach()))
            out = head(roi_feats, queries)
            new_boxes = decode_box_deltas(
                boxes.reshape(-1, 4), out["deltas"].reshape(-1, 4), self.delta_stds, self.scale_clamp, clip
            ).view(b, n, 4)
            if self.shared_query:
                mq = out["queries_msa"] if self.shared_msa else self.mask_attentions[t](queries)
            else:
                msa = self.box_heads[t].attention if self.shared_msa else self.mask_attentions[t]
                mask_q = msa(mask_q)
                mq = mask_q
            outputs.append({"logits": out["logits"], "boxes": new_boxes, "mask_queries": mq})
            queries, boxes = out["queries"], new_boxes.detach()
        return outputs

    # ------------------------------------------------------------------ masks
    def forward_masks(
        self,
        stage: int,
        features: List[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        query_indices: Sequence[torch.Tensor],
        stage_outputs: List[Dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """Mask logits of ``stage`` for selected queries of each image.

        Args:
            stage: 0-based stage index.
            features: the FPN maps.
            boxes: per image ``(R_i, 4)`` xyxy pixels (the RoIs, normally ``b_stage`` detached).
            query_indices: per image ``(R_i,)`` int64 indices of the queries in ``[0, N)``.
            stage_outputs: :meth:`forward_boxes`'s list (its ``"mask_queries"`` are used).
        Returns:
            ``(sum R_i, K, 2S, 2S)`` mask logits, image-major. With mask flow, the heads of stages
            ``0..stage`` run in turn on the same RoI features (HTC), each passing its features on.
        """
        roi_feats = self.mask_pooler(features, [bx.detach() for bx in boxes])
        first = 0 if self.mask_flow else stage
        prev_feats: Optional[torch.Tensor] = None
        logits = None
        for j in range(first, stage + 1):
            mq = stage_outputs[j]["mask_queries"]
            q = torch.cat([mq[i][idx.to(mq.device)] for i, idx in enumerate(query_indices)], dim=0)
            logits, prev_feats = self.mask_heads[j](roi_feats, q, prev_feats)
        return logits
