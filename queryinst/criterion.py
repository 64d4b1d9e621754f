"""QueryInst set-prediction losses, every stage supervised (docs/queryinst.md, official code; ``dii_head.py``,
``dynamic_mask_head.py``, ``query_roi_head.py``).

Per stage ``t`` (weight 1 each), after Hungarian matching of the stage's own predictions
(:class:`~queryinst.matcher.BoxSetMatcher`, costs focal 2.0, L1 5.0, GIoU 2.0):

- ``loss_cls``: sigmoid focal loss (alpha 0.25, gamma 2) over all B x N predictions and K classes,
  unmatched ones against all-zero targets, summed / ``num_pos``; weight 2.0.
- ``loss_bbox``: L1 between matched xyxy boxes divided by the image ``(w, h, w, h)``, summed /
  ``num_pos``; weight 5.0.
- ``loss_giou``: ``1 - GIoU`` of matched pixel boxes, summed / ``num_pos``; weight 2.0.
- ``loss_mask``: dice ``1 - 2 sum(pt) / ((sum(p^2) + eps) + (sum(t^2) + eps))`` (eps 1e-5 added to each
  sum, mmdetection's ``dice_loss`` with ``naive_dice=False``) between the sigmoid of the GT-class channel
  of the 28x28 mask logits of each matched query and its target, summed / ``num_pos``; weight 8.0.
  The mask RoI is the stage's refined box ``b_t`` (detached); the target is the GT mask, zero-padded
  to the padded batch size, cropped and resized to that box *clipped to the padded mask* by
  RoIAlign (aligned, adaptive sampling) and binarized at 0.5 (mmdetection 3.x
  ``mask_target_single``: ``np.clip`` of the box to ``[0, gt_masks.width]`` x
  ``[0, gt_masks.height]``, the masks padded to ``batch_input_shape`` by ``DetDataPreprocessor``
  with ``pad_mask=True``; the mask head itself pools the unclipped box).

``num_pos`` is the number of matched predictions in the batch (``min(N, #GT)`` per image), averaged
over DDP ranks, at least 1.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, roi_align

from instseg.modeling.losses import (
    dice_loss,
    focal_classification_loss,
    gather_matched_targets,
    matched_prediction_index,
    matched_target_classes,
    num_instances_across_ranks,
)
from instseg.utils.profiling import region

from .matcher import BoxSetMatcher

__all__ = ["QueryInstCriterion", "crop_mask_targets"]


def crop_mask_targets(
    gt_masks: torch.Tensor,
    boxes: torch.Tensor,
    gt_indices: torch.Tensor,
    size: int = 28,
    pad_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Crop ground-truth masks to boxes and resize them to ``size x size`` (binary targets), as
    mmdetection's ``mask_target_single`` does.

    Args:
        gt_masks: ``(M, H, W)`` bool or float masks of one image (input pixels).
        boxes: ``(R, 4)`` xyxy pixels, the RoIs (may reach past the image).
        gt_indices: ``(R,)`` int64, which GT mask each RoI is compared with.
        size: output side (28).
        pad_size: ``(Hp, Wp)`` of the padded batch: the masks are zero-padded at the bottom/right
            to it first (mmdetection pads the GT masks to ``batch_input_shape``); ``None`` keeps
            ``(H, W)``.
    Returns:
        ``(R, size, size)`` float32 in {0, 1}: each box clipped to the (padded) mask,
        ``x`` to ``[0, Wp]`` and ``y`` to ``[0, Hp]``, then ``roi_align`` of the float mask
        (aligned, adaptive sampling), thresholded at 0.5.
    Raises:
        ValueError: ``pad_size`` smaller than the masks.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size), dtype=torch.float32)
    m = gt_masks.to(boxes.device, torch.float32)[:, None]
    if pad_size is not None:
        ph, pw = int(pad_size[0]), int(pad_size[1])
        if ph < m.shape[-2] or pw < m.shape[-1]:
            raise ValueError(f"pad_size {(ph, pw)} is smaller than the masks {tuple(m.shape[-2:])}")
        m = F.pad(m, (0, pw - m.shape[-1], 0, ph - m.shape[-2]))
    h, w = m.shape[-2:]
    b = boxes.float()
    b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1)
    rois = torch.cat([gt_indices.to(boxes.device, torch.float32)[:, None], b], dim=1)
    return (roi_align(m, rois, size, 1.0, 0, True)[:, 0] >= 0.5).float()


class QueryInstCriterion(nn.Module):
    """Matches and computes the weighted losses of every stage.

    Args:
        num_classes: K.
        matcher: the box set matcher.
        class_weight, l1_weight, giou_weight, mask_weight: 2.0, 5.0, 2.0, 8.0.
        focal_alpha, focal_gamma: 0.25, 2.0.
        dice_eps: mmdetection's ``DiceLoss`` eps (1e-5), added to each of the two sums of the
            denominator (so ``2 * dice_eps`` in all).
        mask_size: side of the mask targets (28 = 2 x the 14x14 mask RoI).
        stage_weights: one weight per stage (all 1.0 officially); empty = 1.0 for every stage.

    Raises:
        ValueError: a negative loss weight.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: BoxSetMatcher,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_eps: float = 1e-5,
        mask_size: int = 28,
        stage_weights: Sequence[float] = (),
    ):
        super().__init__()
        if min(class_weight, l1_weight, giou_weight, mask_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_cls": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight, "loss_mask": mask_weight}
        self.focal_alpha, self.focal_gamma, self.dice_eps, self.mask_size = focal_alpha, focal_gamma, dice_eps, mask_size
        self.stage_weights = [float(w) for w in stage_weights]

    @classmethod
    def from_config(cls, cfg) -> "QueryInstCriterion":
        q = cfg.MODEL.QUERY_INST
        return cls(
            num_classes=cfg.MODEL.NUM_CLASSES,
            matcher=BoxSetMatcher(q.MATCHER.COST_CLASS, q.MATCHER.COST_L1, q.MATCHER.COST_GIOU,
                                  q.LOSS.FOCAL_ALPHA, q.LOSS.FOCAL_GAMMA),
            class_weight=q.LOSS.CLASS_WEIGHT,
            l1_weight=q.LOSS.L1_WEIGHT,
            giou_weight=q.LOSS.GIOU_WEIGHT,
            mask_weight=q.LOSS.MASK_WEIGHT,
            focal_alpha=q.LOSS.FOCAL_ALPHA,
            focal_gamma=q.LOSS.FOCAL_GAMMA,
            dice_eps=q.LOSS.DICE_EPS,
            mask_size=2 * q.MASK_POOLER_RESOLUTION,
            stage_weights=q.LOSS.STAGE_WEIGHTS,
        )

    def box_losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        image_whwh: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: List[Tuple[torch.Tensor, torch.Tensor]],
        num_pos: float,
    ) -> Dict[str, torch.Tensor]:
        """Unweighted ``loss_cls``, ``loss_bbox``, ``loss_giou`` of one stage.

        Args:
            logits: ``(B, N, K)``; boxes: ``(B, N, 4)`` xyxy pixels; image_whwh: ``(B, 4)``.
            targets: per image ``labels`` ``(M,)``, ``boxes`` ``(M, 4)``.
            indices: the matcher's per-image ``(pred_idx, tgt_idx)``.
        """
        b, n, k = logits.shape
        target_classes = matched_target_classes(targets, indices, (b, n), k, logits.device)
        losses = {
            "loss_cls": focal_classification_loss(logits.flatten(0, 1), target_classes.flatten(),
                                                  self.focal_alpha, self.focal_gamma) / num_pos
        }
        batch_idx, src_idx = matched_prediction_index(indices, boxes.device)
        src_boxes = boxes[batch_idx, src_idx].float()
        tgt_boxes = gather_matched_targets(targets, indices, "boxes", boxes.device).to(boxes.dtype).float()
        norms = image_whwh[batch_idx].float()
        if src_boxes.shape[0] == 0:
            zero = boxes.sum() * 0.0
            losses["loss_bbox"], losses["loss_giou"] = zero, zero
        else:
            losses["loss_bbox"] = (src_boxes / norms - tgt_boxes / norms).abs().sum() / num_pos
            losses["loss_giou"] = generalized_box_iou_loss(src_boxes, tgt_boxes, reduction="sum") / num_pos
        return losses

    def mask_loss(self, mask_logits: torch.Tensor, labels: torch.Tensor, mask_targets: torch.Tensor, num_pos: float) -> torch.Tensor:
        """Unweighted dice on the GT-class channel: ``mask_logits`` ``(R, K, S, S)``, ``labels``
        ``(R,)``, ``mask_targets`` ``(R, S, S)`` -> scalar (summed / ``num_pos``)."""
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        pred = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), labels]
        # mmdetection: (sum(p^2) + eps) + (sum(t^2) + eps), the eps once on each sum
        return dice_loss(pred.flatten(1), mask_targets.flatten(1), squared=True, eps_den=2 * self.dice_eps, reduction="sum") / num_pos

    def forward(
        self,
        roi_head: nn.Module,
        features: List[torch.Tensor],
        stage_outputs: List[Dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        pad_size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of every stage, named ``stage{t}_loss_{cls,bbox,giou,mask}``.

        Args:
            roi_head: the :class:`~queryinst.roi_head.QueryRoIHead` (runs the mask heads on the
                matched queries).
            features: FPN maps; stage_outputs: ``roi_head.forward_boxes``'s list.
            image_sizes: ``(B, 2)`` unpadded ``(h, w)``.
            targets: per image ``labels`` int64 ``(M,)``, ``boxes`` ``(M, 4)`` xyxy pixels,
                ``masks`` bool ``(M, h, w)`` at the unpadded input size.
            pad_size: ``(Hp, Wp)`` of the padded image batch, to which the GT masks are padded
                for the mask targets (:func:`crop_mask_targets`); ``None``: not padded.
        Raises:
            ValueError: ``STAGE_WEIGHTS`` has a length other than the number of stages.
        """
        num_stages = len(stage_outputs)
        stage_w = self.stage_weights or [1.0] * num_stages
        if len(stage_w) != num_stages:
            raise ValueError(f"LOSS.STAGE_WEIGHTS has {len(stage_w)} values for {num_stages} stages")
        wh = image_sizes.flip(-1).float()
        whwh = torch.cat([wh, wh], dim=-1)
        losses: Dict[str, torch.Tensor] = {}
        # The one-to-one matching makes min(N, #GT) positives per image in every stage
        # (mmdet's avg_factor = reduce_mean(num_pos)).
        logits0 = stage_outputs[0]["logits"]
        num_pos = num_instances_across_ranks(targets, logits0.device, max_per_image=logits0.shape[1])
        for t, out in enumerate(stage_outputs):
            logits, boxes = out["logits"], out["boxes"]
            with region("matching"):
                indices = self.matcher(logits.detach(), boxes.detach(), whwh, targets)
            stage_losses = self.box_losses(logits, boxes, whwh.to(boxes.device), targets, indices, num_pos)

            dev = boxes.device
            pos_boxes = [boxes[i].detach()[src.to(dev)] for i, (src, _) in enumerate(indices)]
            if sum(len(pb) for pb in pos_boxes) == 0:
                # keep every mask parameter (and the mask queries' own MSA/embedding, Table 6) in
                # the graph with a zero loss, as DDP needs
                zero = sum(p.sum() for p in roi_head.mask_heads[t].parameters()) + out["mask_queries"].sum()
                stage_losses["loss_mask"] = zero * 0.0
            else:
                mask_logits = roi_head.forward_masks(t, features, pos_boxes, [src for src, _ in indices], stage_outputs)
                labels = gather_matched_targets(targets, indices, "labels", dev)
                mask_targets = torch.cat([
                    crop_mask_targets(targets[i]["masks"], pos_boxes[i], tgt.to(dev), self.mask_size, pad_size)
                    for i, (_, tgt) in enumerate(indices)
                ])
                stage_losses["loss_mask"] = self.mask_loss(mask_logits, labels, mask_targets, num_pos)
            for name, value in stage_losses.items():
                losses[f"stage{t}_{name}"] = value * self.weights[name] * stage_w[t]
        return losses
