"""FastInst losses (main paper, "loss function"; official ``fastinst/modeling/criterion.py``, docs/fastinst.md).

For the final predictions and, with deep supervision, for every auxiliary prediction (the GT-mask
guided ones first, then the initial queries' and the intermediate layers'):

* ``loss_cls``: softmax cross-entropy over K + 1 classes for all N_a queries (unmatched ones ->
  no object), the no-object class weighted by ``NO_OBJECT_WEIGHT`` (0.1) in a weighted mean; x 2.0.
* ``loss_mask``: binary cross-entropy of the matched masks on ``TRAIN_NUM_POINTS`` (12,544)
  importance-sampled points (oversample 3.0, importance 0.75; PointRend), mean over points, summed
  over matches and divided by the number of GT instances (all-reduced over DDP ranks, >= 1); x 5.0.
* ``loss_dice``: dice loss with +1 smoothing on the same points, summed / instances; x 5.0.

Once per image batch, for the IA-guided query classifier (Table I "B"):

* ``loss_proposal``: cross-entropy over every E4 pixel of the auxiliary classifier; the pixels
  Hungarian-matched to a GT instance (class + location cost, :meth:`MaskLocationMatcher.match_pixels`)
  take its class, all others the no-object class; unweighted mean; x 20.0.

Auxiliary terms are named ``<loss>_<i>`` (official naming; the class term is ``loss_cls`` here,
the official ``loss_ce``, as in every model of this repository). All losses are returned already
multiplied by their weights.

Matching (official ``SetCriterion.forward``): an output that carries ``pred_matching_indices``
(the GT-mask-guided ones: the matching the decoder computed on the last layer for the guidance)
is supervised with them; every other output is matched here, each with its own random draw of
matching points. The decoder sets ``None`` on the final output, so the last layer's predictions
are matched twice per iteration (in the decoder for the guidance, here for their loss). Order,
as in the official code: the proposal matching and loss, then the final output (match, class
loss, mask losses), then each auxiliary output in turn; with D layers and GT-mask guidance that
is 1 + D matcher calls here (final + the initial and first D - 1 layers' outputs) besides the
decoder's one, and one pixel matching for the proposals.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.losses import (
    dice_loss,
    gather_matched_targets,
    matched_prediction_index,
    matched_target_classes,
    num_instances_across_ranks,
)
from instseg.utils.profiling import region

from .matcher import MaskLocationMatcher
from .point_sample import calculate_uncertainty, point_sample, uncertain_point_coords_with_randomness

__all__ = ["FastInstCriterion"]

_Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class FastInstCriterion(nn.Module):
    """Computes the weighted FastInst losses.

    Args:
        num_classes: K.
        matcher: :class:`fastinst.matcher.MaskLocationMatcher` (costs class 2, mask 5,
            dice 5, location 1000).
        class_weight, mask_weight, dice_weight, proposal_weight: 2.0, 5.0, 5.0, 20.0.
        no_object_weight: CE weight of the no-object class (0.1).
        num_points, oversample_ratio, importance_sample_ratio: 12,544, 3.0, 0.75.
        deep_supervision: also supervise ``aux_outputs``.

    The buffer ``empty_weight`` ``(K + 1,)`` holds the CE class weights (official key).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: MaskLocationMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        proposal_weight: float = 20.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_cls": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight,
                        "loss_proposal": proposal_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    @classmethod
    def from_config(cls, cfg) -> "FastInstCriterion":
        fi = cfg.MODEL.FASTINST
        matcher = MaskLocationMatcher(
            cost_class=fi.CLASS_WEIGHT,
            cost_mask=fi.MASK_WEIGHT,
            cost_dice=fi.DICE_WEIGHT,
            cost_location=fi.LOCATION_WEIGHT,
            num_points=fi.TRAIN_NUM_POINTS,
        )
        return cls(
            cfg.MODEL.NUM_CLASSES,
            matcher,
            class_weight=fi.CLASS_WEIGHT,
            mask_weight=fi.MASK_WEIGHT,
            dice_weight=fi.DICE_WEIGHT,
            proposal_weight=fi.PROPOSAL_WEIGHT,
            no_object_weight=fi.NO_OBJECT_WEIGHT,
            num_points=fi.TRAIN_NUM_POINTS,
            oversample_ratio=fi.OVERSAMPLE_RATIO,
            importance_sample_ratio=fi.IMPORTANCE_SAMPLE_RATIO,
            deep_supervision=fi.DEEP_SUPERVISION,
        )

    def loss_labels(self, logits: torch.Tensor, targets, indices: _Indices) -> torch.Tensor:
        """Weighted softmax CE; ``logits`` ``(B, N, K + 1)``."""
        b, n, _ = logits.shape
        target_classes = matched_target_classes(targets, indices, (b, n), self.num_classes, logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.float())

    def loss_masks(self, masks: torch.Tensor, targets, indices: _Indices, num_masks: float) -> Dict[str, torch.Tensor]:
        """Point-sampled BCE and dice; ``masks`` ``(B, N, h, w)`` logits, target masks
        ``(M, Hp, Wp)`` at the padded input (same normalized extent)."""
        batch_idx, src_idx = matched_prediction_index(indices, masks.device)
        src_masks = masks[batch_idx, src_idx].float()[:, None]
        if src_masks.shape[0] == 0:
            zero = masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        tgt_masks = gather_matched_targets(targets, indices, "masks", masks.device).float()[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords_with_randomness(
                src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = point_sample(tgt_masks, coords)[:, 0]
        point_logits = point_sample(src_masks, coords)[:, 0]
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum() / num_masks
        dice = dice_loss(point_logits, point_labels, squared=False, eps_num=1.0, eps_den=1.0, reduction="sum") / num_masks
        return {"loss_mask": bce, "loss_dice": dice}

    def loss_proposals(self, proposal_logits: torch.Tensor, targets) -> torch.Tensor:
        """CE over every pixel of the ``(B, K + 1, h, w)`` auxiliary classifier map."""
        with region("matching"):
            indices = self.matcher.match_pixels(proposal_logits, targets)
        b, _, h, w = proposal_logits.shape
        target_classes = matched_target_classes(targets, indices, (b, h * w), self.num_classes, proposal_logits.device)
        return F.cross_entropy(proposal_logits.float().flatten(2), target_classes)

    def _match(self, out: Dict, targets, locations) -> _Indices:
        """``out["pred_matching_indices"]`` when given (GT-mask-guided outputs), else a new matching."""
        if out.get("pred_matching_indices") is not None:
            return out["pred_matching_indices"]
        with region("matching"):
            return self.matcher(out["pred_logits"].detach(), out["pred_masks"].detach(), targets, locations)

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the decoder's training output (``pred_logits``, ``pred_masks``,
                ``proposal_logits``, ``query_locations``, ``aux_outputs``,
                ``pred_matching_indices``; each auxiliary output may carry its own
                ``pred_matching_indices``, see the module docstring).
            targets: per image ``"labels"`` int64 ``(M,)`` and ``"masks"`` bool ``(M, Hp, Wp)``
                zero-padded to the padded input.

        Returns:
            weighted scalar losses ``loss_cls``, ``loss_mask``, ``loss_dice``, ``<name>_<i>`` for the
            auxiliary predictions and ``loss_proposal`` (IA-guided queries only).
        """
        device = outputs["pred_logits"].device
        proposal = None
        if outputs.get("proposal_logits") is not None:  # official: first (no random draw in it)
            proposal = self.loss_proposals(outputs["proposal_logits"], targets) * self.weights["loss_proposal"]
        num_masks = num_instances_across_ranks(targets, device)
        locations = outputs.get("query_locations")
        final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"],
                 "pred_matching_indices": outputs.get("pred_matching_indices")}
        groups: List[Tuple[str, Dict]] = [("", final)]
        if self.deep_supervision:
            groups += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses: Dict[str, torch.Tensor] = {}
        for suffix, out in groups:
            indices = self._match(out, targets, locations)
            losses["loss_cls" + suffix] = self.loss_labels(out["pred_logits"], targets, indices) * self.weights["loss_cls"]
            for name, value in self.loss_masks(out["pred_masks"], targets, indices, num_masks).items():
                losses[name + suffix] = value * self.weights[name]
        if proposal is not None:
            losses["loss_proposal"] = proposal
        return losses
