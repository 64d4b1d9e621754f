"""FASSST meta-architecture (Cheng et al., "FASSST: Fast Attention Based Single-Stage
Segmentation Net for Real-Time Instance Segmentation", WACV 2022; Fig. 3, Fig. 7, Algorithm 1).

Frame ``F`` -> network head -> raw features ``E`` (Eq. 1) -> instance attention module ->
slot tensor ``I`` ``(B, n, 4 + s)`` (Eq. 2); in parallel the backbone's later layers feed the
pyramid mask layers; the slots' boxes locate the ROIs on them, RoIAlign + RFF fuse the ROI
features (Eq. 3-4) and the mask tail (5 convs + 1 deconv) predicts each instance's mask.

Inference (our reading; the paper describes none): per slot, score = max class probability
(times the confidence when ``IAM.CONFIDENCE``), label = its argmax; slots above
``SCORE_THRESHOLD`` (0.05), at most ``TEST.DETECTIONS_PER_IMAGE`` (the highest), no NMS
(one-to-one assignment in training makes the slots a set; ``NMS_THRESHOLD > 0`` adds class-wise
box NMS). Boxes are clipped to the input image and are the RoIs of the mask tail; then the shared
RoI post-processing (:func:`instseg.modeling.roi_masks_to_instances`): the ``2S x 2S`` mask
probabilities are pasted into those boxes scaled to the original image size, foreground where
``> MASK_THRESHOLD`` (0.5). Returned ``boxes`` are the slot boxes at the original size.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import batched_nms

from instseg.config import configurable
from instseg.modeling import (
    META_ARCH_REGISTRY,
    MetaArchBase,
    boxes_from_masks,
    collect_targets,
    roi_masks_to_instances,
    select_top,
)
from instseg.modeling.backbone import build_backbone

from .criterion import FASSSTCriterion
from .instance_attention import InstanceAttentionModule, tlbr_to_xyxy
from .mask_tail import MaskTail
from .rff import PyramidMaskLayers, RoIFeatureFusion

__all__ = ["FASSST"]


@META_ARCH_REGISTRY.register()
class FASSST(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses (``loss_mask``,
    ``loss_loc``, ``loss_cls``; Eq. 5); eval -> one dict per image with ``scores`` ``(K,)``,
    ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)`` and ``boxes`` ``(K, 4)``
    xyxy pixels at the original size (docs/architecture.md, Data contract).

    Raises:
        ValueError: ``MODEL.NUM_CLASSES`` not resolved (< 1), ``IAM.IN_FEATURE`` or a
            ``PYRAMID.IN_FEATURES`` name the backbone does not return, pyramid strides that do not
            double, or any invalid module option (the message names the key).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        iam: nn.Module,
        mask_layers: nn.Module,
        rff: nn.Module,
        mask_tail: nn.Module,
        criterion: nn.Module,
        iam_feature: str,
        pyramid_features: List[str],
        pixel_mean,
        pixel_std,
        size_divisibility: int = 32,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.0,
    ):
        super().__init__(pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold)
        self.backbone = backbone
        self.iam = iam
        self.mask_layers = mask_layers
        self.rff = rff
        self.mask_tail = mask_tail
        self.criterion = criterion
        self.iam_feature = iam_feature
        self.pyramid_features = list(pyramid_features)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        f = cfg.MODEL.FASSST
        if cfg.MODEL.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.NUM_CLASSES must be >= 1 (the tools resolve -1 from the dataset), got {cfg.MODEL.NUM_CLASSES}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if f.IAM.IN_FEATURE not in shapes:
            raise ValueError(
                f"MODEL.FASSST.IAM.IN_FEATURE '{f.IAM.IN_FEATURE}' is not an output of {cfg.MODEL.BACKBONE.NAME} "
                f"({sorted(shapes)}); 'head' needs build_fassst_mobilenet_v2_backbone"
            )
        pyramid = list(f.PYRAMID.IN_FEATURES)
        missing = [p for p in pyramid if p not in shapes]
        if missing:
            raise ValueError(f"MODEL.FASSST.PYRAMID.IN_FEATURES {missing} are not outputs of the backbone ({sorted(shapes)})")
        if not f.RFF.ENABLED:
            pyramid = pyramid[:1]  # Table 9 "without": only the first pyramid mask layer is used
        return {
            **cls.base_config(cfg),
            "backbone": backbone,
            "iam": InstanceAttentionModule.from_config(cfg, shapes[f.IAM.IN_FEATURE].channels),
            "mask_layers": PyramidMaskLayers(
                [shapes[p].channels for p in pyramid], dim=f.PYRAMID.DIM, num_convs=f.PYRAMID.NUM_CONVS, norm=f.PYRAMID.NORM
            ),
            "rff": RoIFeatureFusion(
                [shapes[p].stride for p in pyramid],
                roi_size=f.RFF.ROI_SIZE,
                enabled=f.RFF.ENABLED,
                upsample=f.RFF.UPSAMPLE,
                sampling_ratio=f.RFF.SAMPLING_RATIO,
                aligned=f.RFF.ALIGNED,
            ),
            "mask_tail": MaskTail.from_config(cfg, f.PYRAMID.DIM),
            "criterion": FASSSTCriterion.from_config(cfg),
            "iam_feature": f.IAM.IN_FEATURE,
            "pyramid_features": pyramid,
            "mask_threshold": f.MASK_THRESHOLD,
            "score_threshold": f.SCORE_THRESHOLD,
            "nms_threshold": f.NMS_THRESHOLD,
        }

    # ------------------------------------------------------------------ network
    def _features(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(B, 3, Hp, Wp)`` -> slot tensor ``I`` ``(B, n, 4 + s)`` and the pyramid mask features
        ``[(B, d, Hp / s_k, Wp / s_k)]``."""
        feats = self.backbone(images)
        slots = self.iam(feats[self.iam_feature])
        pyramid = self.mask_layers([feats[p] for p in self.pyramid_features])
        return slots, pyramid

    def predict_masks(self, pyramid: List[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """ROIs ``(K, 5)`` (batch index, xyxy input pixels) -> mask logits ``(K, 2S, 2S)``."""
        return self.mask_tail(self.rff(pyramid, rois))

    def flops_forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network only, masks for all ``n`` slots: normalized ``(B, 3, Hp, Wp)`` ->
        ``{"slots": (B, n, 4 + s), "pred_masks": (B, n, 2S, 2S)}``."""
        slots, pyramid = self._features(images)
        b, n = slots.shape[:2]
        boxes = tlbr_to_xyxy(slots[..., :4].sigmoid(), images.shape[-2], images.shape[-1])
        batch_idx = torch.arange(b, device=images.device, dtype=boxes.dtype).repeat_interleave(n)
        rois = torch.cat([batch_idx[:, None], boxes.flatten(0, 1)], dim=1)
        masks = self.predict_masks(pyramid, rois)
        return {"slots": slots, "pred_masks": masks.view(b, n, *masks.shape[-2:])}

    # ------------------------------------------------------------------ contract
    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        padded = (int(images.shape[-2]), int(images.shape[-1]))
        slots, pyramid = self._features(images)
        parts = self.iam.split(slots)
        if self.training:
            targets = collect_targets(batched_inputs, ("labels", "masks"), self.device)
            for t, x in zip(targets, batched_inputs):
                boxes = x["instances"].get("boxes")
                t["boxes"] = boxes.to(self.device) if boxes is not None else boxes_from_masks(t["masks"])
            return self.criterion(parts, targets, padded, lambda rois: self.predict_masks(pyramid, rois))
        return self.inference(parts, pyramid, batched_inputs, sizes, padded)

    def _slot_predictions(self, parts, padded_size, image_sizes: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per slot: ``scores`` ``(B, n)`` (max class probability, times the confidence when
        ``IAM.CONFIDENCE``), ``labels`` int64 ``(B, n)`` (its argmax) and ``boxes`` ``(B, n, 4)``
        xyxy input pixels clipped to each image's ``(h, w)`` (``image_sizes`` ``(B, 2)``), the
        mask tail's RoIs. Traceable (the exported graph computes it)."""
        probs = parts["class_logits"].float().sigmoid()
        if parts["confidence_logits"] is not None:
            probs = probs * parts["confidence_logits"].float().sigmoid()[..., None]
        scores, labels = probs.max(dim=-1)
        x1, y1, x2, y2 = tlbr_to_xyxy(parts["box_logits"].float().sigmoid(), padded_size[0], padded_size[1]).unbind(-1)
        hw = image_sizes.to(x1.dtype)
        h, w = hw[:, :1], hw[:, 1:]  # (B, 1): clamp(0, w) per image
        boxes = torch.stack([torch.minimum(x1.clamp(min=0), w), torch.minimum(y1.clamp(min=0), h),
                             torch.minimum(x2.clamp(min=0), w), torch.minimum(y2.clamp(min=0), h)], dim=-1)
        return scores, labels, boxes

    def _select(self, scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One image's ``(n,)`` / ``(n, 4)`` slot predictions -> indices of the kept slots: above
        ``SCORE_THRESHOLD``, optional class-wise NMS, the ``TEST.DETECTIONS_PER_IMAGE`` highest."""
        keep = (scores > self.score_threshold).nonzero(as_tuple=True)[0]
        if self.nms_threshold > 0 and keep.numel():
            keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_threshold)]
        return keep[select_top(scores[keep], self.detections_per_image)[1]]

    def _to_instances(self, mask_probs, kept, batched_inputs, image_sizes) -> List[Dict[str, torch.Tensor]]:
        results, start = [], 0
        for i, (x, (scores, labels, boxes)) in enumerate(zip(batched_inputs, kept)):
            h, w = image_sizes[i]
            out_size = (int(x.get("height", h)), int(x.get("width", w)))
            k = len(scores)
            results.append(roi_masks_to_instances(
                mask_probs[start : start + k], scores, labels, boxes, (h, w), out_size, mask_threshold=self.mask_threshold,
            ))
            start += k
        return results

    @torch.no_grad()
    def internals(self, batched_inputs: List[Dict], score_threshold: float = 0.5) -> List[Dict]:
        """Per image the result of ``self(batched_inputs)`` and one ``"boxes"`` panel: the box of
        every one of the ``n`` slots of the instance information tensor ``I`` (the IAM's box
        regression, Eq. 2, ``sigmoid`` of the ``(t, l, b, r)`` logits at the padded input size,
        before the clipping, the RFF and the mask tail), in original pixels, the kept slots
        (:func:`instseg.modeling.internals.select_kept`) marked with their result row. A kept
        slot's output box is its slot box clipped to the image. (FASSST's IAM pools to the slot
        grid: it has no per-instance activation map to show.) See
        :meth:`instseg.modeling.MetaArchBase.internals`."""
        from instseg.modeling.internals import boxes_panel, input_to_original, select_kept

        self._check_internals_mode()
        images, sizes = self.preprocess_images(batched_inputs)
        padded = (int(images.shape[-2]), int(images.shape[-1]))
        slots, pyramid = self._features(images)
        parts = self.iam.split(slots)
        slot_indices: List[torch.Tensor] = []
        results = self.inference(parts, pyramid, batched_inputs, sizes, padded, slot_indices=slot_indices)
        boxes_all = tlbr_to_xyxy(parts["box_logits"].float().sigmoid(), padded[0], padded[1])
        n = boxes_all.shape[1]
        out = []
        for i, (res, x) in enumerate(zip(results, batched_inputs)):
            out_size = (int(x.get("height", sizes[i][0])), int(x.get("width", sizes[i][1])))
            rows = select_kept(res["scores"], score_threshold)
            slot_rows = torch.full((n,), -1, dtype=torch.int64)
            slot_rows[slot_indices[i][rows.to(slot_indices[i].device)].cpu()] = rows
            out.append({"result": res, "panels": [boxes_panel(
                f"IAM slot boxes (all n = {n} slots; kept ones coloured)",
                input_to_original(boxes_all[i], sizes[i], out_size), instances=slot_rows)]})
        return out

    @torch.no_grad()
    def inference(self, parts, pyramid, batched_inputs, image_sizes, padded_size,
                  slot_indices: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Split slot tensor and pyramid mask features -> one result dict per image (module
        docstring). When ``slot_indices`` is a list, the int64 ``(K,)`` slot of each result row is
        appended to it per image (for :meth:`internals`)."""
        sizes = torch.tensor([list(hw) for hw in image_sizes], dtype=torch.int64, device=parts["box_logits"].device)
        scores_all, labels_all, boxes_all = self._slot_predictions(parts, padded_size, sizes)
        kept = []
        for i in range(len(batched_inputs)):
            keep = self._select(scores_all[i], labels_all[i], boxes_all[i])
            kept.append((scores_all[i][keep], labels_all[i][keep], boxes_all[i][keep]))
            if slot_indices is not None:
                slot_indices.append(keep)
        rois = torch.cat(
            [torch.cat([torch.full((len(b), 1), float(i), device=b.device), b], dim=1) for i, (_, _, b) in enumerate(kept)]
        )
        mask_probs = self.predict_masks(pyramid, rois).float().sigmoid() if rois.shape[0] else rois.new_zeros((0, 1, 1))
        return self._to_instances(mask_probs, kept, batched_inputs, image_sizes)

    # ------------------------------------------------------------------ export
    def export_forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The exported graph (docs/deploy.md, "Export (ONNX)"): normalized ``(B, 3, Hp, Wp)`` and
        ``(B, 2)`` int64 ``(h, w)`` -> per slot ``scores`` ``(B, n)``, ``labels`` int64 ``(B, n)``,
        ``boxes`` ``(B, n, 4)`` (clipped, as :meth:`inference`) and ``pred_masks`` ``(B, n, 2S, 2S)``,
        the mask tail's logits on all ``n`` slot boxes (the tail is per RoI, so the kept slots'
        masks are those :meth:`inference` computes for them alone)."""
        slots, pyramid = self._features(images)
        scores, labels, boxes = self._slot_predictions(self.iam.split(slots), images.shape[-2:], image_sizes)
        b, n = scores.shape
        batch_idx = torch.arange(b, device=images.device, dtype=boxes.dtype).repeat_interleave(n)
        masks = self.predict_masks(pyramid, torch.cat([batch_idx[:, None], boxes.flatten(0, 1)], dim=1))
        return {"scores": scores, "labels": labels, "boxes": boxes, "pred_masks": masks.view(b, n, *masks.shape[-2:])}

    @torch.no_grad()
    def export_postprocess(self, outputs, batched_inputs, image_sizes, padded_size) -> List[Dict[str, torch.Tensor]]:
        """:meth:`export_forward`'s outputs -> the data-contract dicts: per image the slot selection
        of :meth:`inference` (threshold, optional NMS, top-k) and the RoI mask pasting."""
        kept, probs = [], []
        for i in range(len(batched_inputs)):
            scores, labels, boxes = outputs["scores"][i].float(), outputs["labels"][i].long(), outputs["boxes"][i].float()
            keep = self._select(scores, labels, boxes)
            kept.append((scores[keep], labels[keep], boxes[keep]))
            probs.append(outputs["pred_masks"][i][keep].float().sigmoid())
        return self._to_instances(torch.cat(probs), kept, batched_inputs, image_sizes)
