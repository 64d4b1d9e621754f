"""What FastInst's dual-path decoder and the Mask2Former-light baseline share: object queries
(IA-guided or learnable) with auxiliary queries, positional embeddings, and the plumbing of
GT-mask-guided learning (the criterion's matcher, given at construction)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .guidance import Indices as _Indices
from .attention import sine_position_embedding
from .guidance import _repeat_heads, _unblock_empty_rows
from .query_proposal import QueryProposal

__all__ = ["QueryDecoderBase"]


class QueryDecoderBase(nn.Module):
    """Queries (IA-guided or learnable, plus auxiliary ones), positional embeddings and the
    GT-mask-guidance plumbing shared by both decoders.

    ``criterion``: the set criterion whose ``matcher`` pairs the last layer's predictions with the
    targets for GT-mask-guided learning; held as a submodule, as in the official code (so its
    ``empty_weight`` buffer is also ``sem_seg_head.predictor.criterion.empty_weight``). Needed
    only in training with ``gt_mask_guided``.
    """

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
        criterion: Optional[nn.Module] = None,
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
        self.criterion = criterion
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
                "GT-mask-guided learning needs the criterion's matcher: build the decoder with "
                "criterion=... (the FastInst meta-architecture does) or MODEL.FASTINST.GT_MASK_GUIDED False"
            )
        return self.criterion.matcher(pred_logits.detach(), pred_masks.detach(), targets, locations)

    def _guided(self, targets) -> bool:
        return self.training and self.gt_mask_guided and targets is not None


