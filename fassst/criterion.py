"""FASSST losses and the assignment of ground truth to the n slots (Sec. 3.5, Eq. 5-6).

``L = lambda_m L_m + lambda_l L_l + lambda_c L_c`` with ``lambda_m = 5.75``, ``lambda_l = 3``,
``lambda_c = 1.25`` (Eq. 5); ``L_m = 1 - Dice(mask_p, mask_g)`` (Eq. 6); ``L_l`` and ``L_c``
"based on the conventional Focal Loss".

Reading of the paper (docs/fassst.md; each a key of ``MODEL.FASSST.LOSS`` / ``MATCHER``):

* Assignment: the paper does not say how ground truth reaches the slots; we use a one-to-one
  Hungarian assignment (:func:`instseg.modeling.matcher.hungarian_assign`) with the shared box
  cost (:func:`instseg.modeling.matcher.box_cost_matrix`, as QueryInst)
  ``MATCHER.CLASS_WEIGHT * C_cls + MATCHER.LOC_WEIGHT * C_loc + MATCHER.GIOU_WEIGHT * (-GIoU)``
  (1.25, 3 and 0; the first two are the loss weights of Eq. 5): ``C_cls`` is the focal
  classification cost at the target class (:func:`instseg.modeling.losses.focal_cost_matrix`),
  the GIoU that of the normalized boxes (coordinates sorted, :func:`tlbr_to_xyxy`), and ``C_loc``
  (the cost's ``loc_cost`` argument: FASSST's own term) the L1 distance between the slot's and
  the instance's normalized ``(t, l, b, r)`` as predicted, unsorted, so that a slot whose bottom
  lies above its top pays for it (``MATCHER.LOC_COST = "l1"``, DETR / Sparse R-CNN), or ``L_l``
  itself (``"focal"``; its values are so small that the class cost then decides most
  assignments, and training from scratch on varied images drifted: the location loss rose).
  The mask term is left out of the cost
  (a slot's mask is only defined inside its own box, so a pairwise mask cost would need every
  ground truth cropped into every slot's box).
* ``L_c``: sigmoid focal loss (alpha 0.25, gamma 2) of every slot's class logits against one-hot
  targets (unmatched slots: all zeros), summed and divided by the number of instances (RetinaNet).
  With a confidence channel, its focal loss (target 1 for matched slots) is added to ``L_c``.
* ``L_l`` (``LOC_LOSS = "focal"``): the focal loss with the 4 normalized coordinates as soft
  targets, ``|y - p|^gamma * BCE(p, y)`` (for 0/1 targets this is the focal loss without alpha;
  it is 0 only at ``p = y``; Li et al.'s "quality focal loss" form), summed over the 4
  coordinates and divided by the number of instances. ``"l1"`` and ``"giou"`` are alternatives.
* ``L_m``: dice on the ``2S x 2S`` ROI masks of the matched slots against the ground-truth mask
  cut out of the same box with RoIAlign and binarized at 0.5 (Mask R-CNN's targets), averaged
  over the ROIs. ROIs are the matched slots' predicted boxes (Algorithm 1: the ROIs come from
  ``I``), optionally with / replaced by the ground-truth boxes (``TRAIN_BOXES``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, roi_align, sigmoid_focal_loss

from instseg.modeling.losses import (
    dice_loss,
    focal_classification_loss,
    gather_matched_targets,
    matched_prediction_index,
    matched_target_classes,
    num_instances_across_ranks,
)
from instseg.modeling.matcher import box_cost_matrix, hungarian_assign
from instseg.utils.profiling import region

from .instance_attention import tlbr_to_xyxy

__all__ = [
    "FASSSTCriterion",
    "LOC_LOSSES",
    "TRAIN_BOXES",
    "focal_coordinate_loss",
    "mask_targets_in_boxes",
    "normalized_tlbr",
]

LOC_LOSSES = ("focal", "l1", "giou")
LOC_COSTS = ("l1", "focal")
TRAIN_BOXES = ("predicted", "gt", "predicted+gt")


def focal_coordinate_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss for soft targets in [0, 1]: ``|y - p|^gamma * BCE(p, y)``, ``p =
    sigmoid(logits)``. Same shape as the inputs, float32; 0 where ``p == y``."""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (targets - p).abs().pow(gamma)


def normalized_tlbr(boxes_xyxy: torch.Tensor, padded_size: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth ``(M, 4)`` xyxy pixels -> ``(M, 4)`` ``(t, l, b, r)`` as fractions of the padded
    input ``(Hp, Wp)``, clamped to [0, 1]."""
    hp, wp = float(padded_size[0]), float(padded_size[1])
    x1, y1, x2, y2 = boxes_xyxy.float().unbind(-1)
    return torch.stack([y1 / hp, x1 / wp, y2 / hp, x2 / wp], dim=-1).clamp(0.0, 1.0)


def mask_targets_in_boxes(masks: torch.Tensor, gt_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Ground-truth masks cut out of boxes: ``(K, size, size)`` float32 in {0, 1}.

    Args:
        masks: ``(M, H, W)`` bool ground truth of one image (input pixels).
        gt_index: ``(K,)`` int64, which ground truth each box is compared with.
        boxes: ``(K, 4)`` xyxy input pixels.
    """
    if boxes.shape[0] == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1).float()
    t = roi_align(masks[:, None].float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (t[:, 0] >= 0.5).float()


class FASSSTCriterion(nn.Module):
    """Hungarian assignment and weighted FASSST losses.

    Args:
        num_classes: K.
        mask_weight, loc_weight, class_weight: lambda_m, lambda_l, lambda_c (5.75, 3, 1.25).
        loc_loss: ``"focal"``, ``"l1"`` or ``"giou"``.
        loc_focal_gamma: gamma of the focal coordinate loss.
        focal_alpha, focal_gamma: class focal loss.
        dice_squared, dice_eps: Dice of Eq. 6 (``sum p + sum g`` denominator, smoothing 1).
        train_boxes: ``"predicted"``, ``"gt"`` or ``"predicted+gt"``.
        matcher_class_weight, matcher_loc_weight, matcher_giou_weight: cost weights.
        matcher_loc_cost: ``"l1"`` or ``"focal"`` (module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        mask_weight: float = 5.75,
        loc_weight: float = 3.0,
        class_weight: float = 1.25,
        loc_loss: str = "focal",
        loc_focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_squared: bool = False,
        dice_eps: float = 1.0,
        train_boxes: str = "predicted",
        matcher_class_weight: float = 1.25,
        matcher_loc_weight: float = 3.0,
        matcher_loc_cost: str = "l1",
        matcher_giou_weight: float = 0.0,
    ):
        super().__init__()
        if loc_loss not in LOC_LOSSES:
            raise ValueError(f"MODEL.FASSST.LOSS.LOC_LOSS must be one of {LOC_LOSSES}, got '{loc_loss}'")
        if train_boxes not in TRAIN_BOXES:
            raise ValueError(f"MODEL.FASSST.LOSS.TRAIN_BOXES must be one of {TRAIN_BOXES}, got '{train_boxes}'")
        if matcher_loc_cost not in LOC_COSTS:
            raise ValueError(f"MODEL.FASSST.MATCHER.LOC_COST must be one of {LOC_COSTS}, got '{matcher_loc_cost}'")
        self.num_classes = int(num_classes)
        self.weights = {"loss_mask": mask_weight, "loss_loc": loc_weight, "loss_cls": class_weight}
        self.loc_loss, self.loc_focal_gamma = loc_loss, loc_focal_gamma
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.dice_squared, self.dice_eps = dice_squared, dice_eps
        self.train_boxes = train_boxes
        self.matcher_class_weight, self.matcher_loc_weight = matcher_class_weight, matcher_loc_weight
        self.matcher_loc_cost, self.matcher_giou_weight = matcher_loc_cost, matcher_giou_weight

    @classmethod
    def from_config(cls, cfg) -> "FASSSTCriterion":
        f = cfg.MODEL.FASSST
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            mask_weight=f.LOSS.MASK_WEIGHT,
            loc_weight=f.LOSS.LOC_WEIGHT,
            class_weight=f.LOSS.CLASS_WEIGHT,
            loc_loss=f.LOSS.LOC_LOSS,
            loc_focal_gamma=f.LOSS.LOC_FOCAL_GAMMA,
            focal_alpha=f.LOSS.FOCAL_ALPHA,
            focal_gamma=f.LOSS.FOCAL_GAMMA,
            dice_squared=f.LOSS.DICE_SQUARED,
            dice_eps=f.LOSS.DICE_EPS,
            train_boxes=f.LOSS.TRAIN_BOXES,
            matcher_class_weight=f.MATCHER.CLASS_WEIGHT,
            matcher_loc_weight=f.MATCHER.LOC_WEIGHT,
            matcher_loc_cost=f.MATCHER.LOC_COST,
            matcher_giou_weight=f.MATCHER.GIOU_WEIGHT,
        )

    # ------------------------------------------------------------------ localization
    def _loc_cost(self, box_logits: torch.Tensor, tgt_tlbr: torch.Tensor) -> torch.Tensor:
        """``(N, 4)`` slot logits x ``(M, 4)`` targets -> ``(N, M)`` unweighted location cost on the
        unsorted ``(t, l, b, r)``: L1 (``MATCHER.LOC_COST = "l1"``) or the focal coordinate loss."""
        n, m = box_logits.shape[0], tgt_tlbr.shape[0]
        if self.matcher_loc_cost == "focal":
            lg = box_logits.float()[:, None, :].expand(n, m, 4)
            tg = tgt_tlbr.float()[None, :, :].expand(n, m, 4)
            return focal_coordinate_loss(lg, tg, self.loc_focal_gamma).sum(-1)
        return torch.cdist(box_logits.float().sigmoid(), tgt_tlbr.float(), p=1)

    def _loc_matched(self, box_logits: torch.Tensor, tgt_tlbr: torch.Tensor) -> torch.Tensor:
        """Row-wise localization loss ``(K,)`` of matched pairs."""
        if self.loc_loss == "focal":
            return focal_coordinate_loss(box_logits, tgt_tlbr, self.loc_focal_gamma).sum(-1)
        p = box_logits.float().sigmoid()
        if self.loc_loss == "l1":
            return (p - tgt_tlbr.float()).abs().sum(-1)
        return generalized_box_iou_loss(tlbr_to_xyxy(p, 1.0, 1.0), tlbr_to_xyxy(tgt_tlbr.float(), 1.0, 1.0), reduction="none")

    # ------------------------------------------------------------------ matching
    @torch.no_grad()
    def match(
        self, box_logits: torch.Tensor, class_logits: torch.Tensor, targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Hungarian assignment per image.

        Args:
            box_logits: ``(B, n, 4)``; class_logits: ``(B, n, K)``.
            targets: per image ``labels`` ``(M,)`` and ``tlbr`` ``(M, 4)`` normalized.
        Returns:
            per image ``(slot_idx, gt_idx)`` int64 CPU tensors of length ``min(n, M)``.
        Raises:
            instseg.modeling.matcher.NonFiniteCostError: NaN/Inf in the cost (names it).
        """
        out = []
        with torch.autocast(device_type=box_logits.device.type, enabled=False):
            for b, t in enumerate(targets):
                if t["labels"].numel() == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    out.append((empty, empty.clone()))
                    continue
                p, tgt = box_logits[b].float().sigmoid(), t["tlbr"].float()
                cost = box_cost_matrix(
                    class_logits[b],
                    tlbr_to_xyxy(p, 1.0, 1.0),
                    p.new_ones(4),  # boxes are already normalized (and the L1 term is loc_cost)
                    t["labels"],
                    tlbr_to_xyxy(tgt, 1.0, 1.0),
                    cost_class=self.matcher_class_weight,
                    cost_l1=self.matcher_loc_weight,
                    cost_giou=self.matcher_giou_weight,
                    focal_alpha=self.focal_alpha,
                    focal_gamma=self.focal_gamma,
                    loc_cost=self._loc_cost(box_logits[b], t["tlbr"]),
                )
                out.append(hungarian_assign(cost, name="FASSST class + localization cost"))
        return out

    # ------------------------------------------------------------------ losses
    def forward(
        self,
        slots: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        padded_size: Tuple[int, int],
        mask_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            slots: ``box_logits`` ``(B, n, 4)``, ``class_logits`` ``(B, n, K)``,
                ``confidence_logits`` ``(B, n)`` or None (from the IAM).
            targets: per image ``labels`` int64 ``(M,)``, ``boxes`` float ``(M, 4)`` xyxy input
                pixels, ``masks`` bool ``(M, H, W)``.
            padded_size: ``(Hp, Wp)`` of the padded batch.
            mask_fn: ``rois (K, 5)`` (batch index, xyxy input pixels) -> mask logits
                ``(K, 2S, 2S)`` (pyramid mask layers, RFF and tail).
        Returns:
            weighted scalar losses ``loss_mask``, ``loss_loc``, ``loss_cls``.
        """
        box_logits, class_logits = slots["box_logits"], slots["class_logits"]
        conf_logits = slots.get("confidence_logits")
        device = box_logits.device
        tgts = [
            {"labels": t["labels"].to(device), "tlbr": normalized_tlbr(t["boxes"].to(device), padded_size)} for t in targets
        ]
        with region("matching"):
            indices = self.match(box_logits.detach(), class_logits.detach(), tgts)
        num_inst = num_instances_across_ranks(targets, device)

        b, n, k = class_logits.shape
        target_classes = matched_target_classes(tgts, indices, (b, n), k, device)
        loss_cls = focal_classification_loss(class_logits.flatten(0, 1), target_classes.flatten(), self.focal_alpha, self.focal_gamma)
        if conf_logits is not None:
            loss_cls = loss_cls + sigmoid_focal_loss(
                conf_logits.float(), (target_classes < k).float(), self.focal_alpha, self.focal_gamma, reduction="sum"
            )
        losses = {"loss_cls": loss_cls / num_inst}

        batch_idx, src_idx = matched_prediction_index(indices, device)
        gt_idx = torch.cat([g for _, g in indices]).to(device)
        if src_idx.numel() == 0:
            losses["loss_loc"] = box_logits.sum() * 0.0
            # keep every mask parameter in the graph (DDP), value 0
            dummy = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], device=device)
            losses["loss_mask"] = mask_fn(dummy).sum() * 0.0
            return {name: v * self.weights[name] for name, v in losses.items()}

        tgt_tlbr = gather_matched_targets(tgts, indices, "tlbr", device)
        losses["loss_loc"] = self._loc_matched(box_logits[batch_idx, src_idx], tgt_tlbr).sum() / num_inst

        hp, wp = padded_size
        boxes, roi_batch, roi_gt = [], [], []
        if self.train_boxes in ("predicted", "predicted+gt"):
            pred = tlbr_to_xyxy(box_logits[batch_idx, src_idx].detach().float().sigmoid(), hp, wp)
            boxes.append(pred), roi_batch.append(batch_idx), roi_gt.append(gt_idx)
        if self.train_boxes in ("gt", "predicted+gt"):
            gt_boxes = gather_matched_targets(targets, indices, "boxes", device).float()
            boxes.append(gt_boxes), roi_batch.append(batch_idx), roi_gt.append(gt_idx)
        boxes, roi_batch, roi_gt = torch.cat(boxes), torch.cat(roi_batch), torch.cat(roi_gt)
        rois = torch.cat([roi_batch[:, None].float(), boxes], dim=1)
        mask_logits = mask_fn(rois)
        size = mask_logits.shape[-1]
        mask_tgts = mask_logits.new_zeros(mask_logits.shape, dtype=torch.float32)
        for i in range(b):
            sel = roi_batch == i
            if sel.any():
                mask_tgts[sel] = mask_targets_in_boxes(targets[i]["masks"].to(device), roi_gt[sel], boxes[sel], size)
        losses["loss_mask"] = dice_loss(
            mask_logits.flatten(1),
            mask_tgts.flatten(1),
            squared=self.dice_squared,
            eps_num=self.dice_eps,
            eps_den=self.dice_eps,
            reduction="mean",
        )
        return {name: v * self.weights[name] for name, v in losses.items()}
