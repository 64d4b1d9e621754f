"""SparseInst criterion (Sec. 3.5, Eq. 3-4; ablations Tables 5-6).

``L = lambda_c L_cls + L_mask + lambda_s L_s`` with ``L_mask = lambda_dice L_dice + lambda_pix
L_pix``: sigmoid focal classification over all N predictions (divided by the number of
instances, all-reduced over DDP ranks), dice (squared denominator, summed / instances) and pixel
BCE (mean) over matched predictions, and the IoU-aware objectness: BCE (or L1, Table 6) against
the IoU of the binarized predicted mask (sigmoid >= 0.4) with its ground truth (official
``sparseinst/loss.py``, docs/sparseinst.md). Ground-truth masks are zero-padded to the padded input and
bilinearly resized to the 1/4 prediction.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.losses import (
    dice_loss,
    focal_classification_loss,
    gather_matched_targets,
    matched_prediction_index,
    matched_target_classes,
    num_instances_across_ranks,
    sigmoid_focal_loss,
)
from instseg.utils.profiling import region

from .matcher import DiceScoreMatcher
from .objectness import binarized_mask_iou

__all__ = ["SparseInstCriterion", "prepare_target_masks"]


def prepare_target_masks(masks: torch.Tensor, padded_size: Tuple[int, int], out_size: Tuple[int, int]) -> torch.Tensor:
    """bool ``(M, H, W)`` ground truth at the (augmented, unpadded) input size -> float32
    ``(M, h, w)`` in [0, 1]: zero-padded to ``padded_size`` then bilinearly resized to ``out_size``."""
    m = masks.float()
    if m.shape[0] == 0:
        return m.new_zeros((0,) + tuple(out_size))
    m = F.pad(m, (0, padded_size[1] - m.shape[-1], 0, padded_size[0] - m.shape[-2]))
    return F.interpolate(m[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]


class SparseInstCriterion(nn.Module):
    """Computes the weighted SparseInst losses.

    Args:
        num_classes: K.
        matcher: :class:`DiceScoreMatcher` (Eq. 1).
        class_weight, dice_weight, pixel_weight, objectness_weight: lambda_c, lambda_dice,
            lambda_pix, lambda_s (official 2.0, 2.0, 5.0, 1.0).
        use_dice: Table 5 "Dice" column.
        pixel_loss: "bce" | "focal" | "none" (Table 5).
        objectness_loss: "bce" | "l1" | "none" (Table 6).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: DiceScoreMatcher,
        class_weight: float = 2.0,
        dice_weight: float = 2.0,
        pixel_weight: float = 5.0,
        objectness_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        use_dice: bool = True,
        pixel_loss: str = "bce",
        objectness_loss: str = "bce",
        objectness_pred_threshold: float = 0.4,
    ):
        super().__init__()
        if pixel_loss not in ("bce", "focal", "none"):
            raise ValueError(f"MASK_PIXEL_LOSS must be bce/focal/none, got '{pixel_loss}'")
        if objectness_loss not in ("bce", "l1", "none"):
            raise ValueError(f"OBJECTNESS_LOSS must be bce/l1/none, got '{objectness_loss}'")
        if not use_dice and pixel_loss == "none":
            raise ValueError("at least one mask loss (dice or pixel) must be enabled")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {
            "loss_cls": class_weight,
            "loss_dice": dice_weight,
            "loss_mask": pixel_weight,
            "loss_objectness": objectness_weight,
        }
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.use_dice, self.pixel_loss, self.objectness_loss = use_dice, pixel_loss, objectness_loss
        self.objectness_pred_threshold = objectness_pred_threshold

    @classmethod
    def from_config(cls, cfg) -> "SparseInstCriterion":
        s = cfg.MODEL.SPARSE_INST
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            matcher=DiceScoreMatcher(s.MATCHER.ALPHA, s.MATCHER.BETA),
            class_weight=s.LOSS.CLASS_WEIGHT,
            dice_weight=s.LOSS.MASK_DICE_WEIGHT,
            pixel_weight=s.LOSS.MASK_PIXEL_WEIGHT,
            objectness_weight=s.LOSS.OBJECTNESS_WEIGHT,
            focal_alpha=s.LOSS.FOCAL_ALPHA,
            focal_gamma=s.LOSS.FOCAL_GAMMA,
            use_dice=s.LOSS.USE_DICE,
            pixel_loss=s.LOSS.MASK_PIXEL_LOSS,
            objectness_loss=s.LOSS.OBJECTNESS_LOSS,
            objectness_pred_threshold=s.LOSS.OBJECTNESS_PRED_THRESHOLD,
        )

    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]], padded_size: Tuple[int, int]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the decoder's dict (``pred_logits`` ``(B, N, K)``, ``pred_masks`` ``(B, N, h, w)``,
                ``pred_scores`` ``(B, N, 1)``).
            targets: per image ``labels`` int64 ``(M,)`` and ``masks`` bool ``(M, H_i, W_i)``.
            padded_size: ``(Hp, Wp)`` of the padded input batch.
        Returns:
            weighted scalar losses ``loss_cls``, ``loss_dice``, ``loss_mask``, ``loss_objectness``
            (only the enabled ones).
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        out_size = masks.shape[-2:]
        tgts = [
            {"labels": t["labels"], "masks": prepare_target_masks(t["masks"], padded_size, out_size)} for t in targets
        ]
        with region("matching"):
            indices = self.matcher({"pred_logits": logits.detach(), "pred_masks": masks.detach()}, tgts)
        num_inst = num_instances_across_ranks(targets, logits.device)

        b, n, k = logits.shape
        target_classes = matched_target_classes(tgts, indices, (b, n), k, logits.device)
        losses = {
            "loss_cls": focal_classification_loss(
                logits.flatten(0, 1), target_classes.flatten(), self.focal_alpha, self.focal_gamma
            ) / num_inst
        }

        batch_idx, src_idx = matched_prediction_index(indices, masks.device)
        src_masks = masks[batch_idx, src_idx].flatten(1).float()
        tgt_masks = gather_matched_targets(tgts, indices, "masks", masks.device).flatten(1)
        if src_masks.shape[0] == 0:
            zero = masks.sum() * 0.0
            if self.use_dice:
                losses["loss_dice"] = zero
            if self.pixel_loss != "none":
                losses["loss_mask"] = zero
            if self.objectness_loss != "none":
                losses["loss_objectness"] = outputs["pred_scores"].sum() * 0.0
        else:
            if self.use_dice:
                losses["loss_dice"] = dice_loss(src_masks, tgt_masks, squared=True, eps_den=1e-4, reduction="sum") / num_inst
            if self.pixel_loss == "bce":
                losses["loss_mask"] = F.binary_cross_entropy_with_logits(src_masks, tgt_masks, reduction="mean")
            elif self.pixel_loss == "focal":
                losses["loss_mask"] = sigmoid_focal_loss(
                    src_masks, tgt_masks, self.focal_alpha, self.focal_gamma, reduction="mean"
                )
            if self.objectness_loss != "none":
                ious = binarized_mask_iou(src_masks, tgt_masks, self.objectness_pred_threshold)
                src_scores = outputs["pred_scores"][batch_idx, src_idx, 0].float()
                if self.objectness_loss == "bce":
                    losses["loss_objectness"] = F.binary_cross_entropy_with_logits(src_scores, ious, reduction="mean")
                else:
                    losses["loss_objectness"] = F.l1_loss(src_scores.sigmoid(), ious, reduction="mean")
        return {name: value * self.weights[name] for name, value in losses.items()}
