"""SparseInst meta-architecture (Cheng et al., "Sparse Instance Activation for Real-Time Instance
Segmentation", CVPR 2022): backbone -> instance context encoder -> IAM-based decoder.

Inference (Sec. 3.6 and the official ``sparseinst/sparseinst.py``) has no NMS and no sorting:
``score = sqrt(sigmoid(cls) * sigmoid(objectness))`` (Table 6 rescoring), max over classes, keep
scores above ``CLS_THRESHOLD`` (0.005), multiply by the mean mask probability inside the
binarized mask (``MASK_THRESHOLD`` 0.45), upsample the mask probabilities to the padded input,
crop, resize to the original image and threshold at 0.45; boxes are the masks' tight boxes.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, boxes_from_masks, masks_to_original
from instseg.modeling.backbone import build_backbone

from .decoder import IAMDecoder
from .encoder import InstanceContextEncoder
from .loss import SparseInstCriterion

__all__ = ["SparseInst"]


@META_ARCH_REGISTRY.register()
class SparseInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses; eval -> one dict per
    image with ``scores`` ``(K,)``, ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)``
    and ``boxes`` ``(K, 4)`` xyxy pixels at the original size (docs/architecture.md, Data contract).
    """

    def __init__(self, cfg):
        super().__init__(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.SIZE_DIVISIBILITY)
        s = cfg.MODEL.SPARSE_INST
        self.backbone = build_backbone(cfg)
        self.encoder = InstanceContextEncoder.from_config(cfg, self.backbone.output_shape())
        self.decoder = IAMDecoder.from_config(cfg, self.encoder.out_channels)
        self.criterion = SparseInstCriterion.from_config(cfg)
        self.num_classes = cfg.MODEL.NUM_CLASSES
        self.cls_threshold = s.CLS_THRESHOLD
        self.mask_threshold = s.MASK_THRESHOLD
        self.max_detections = s.MAX_DETECTIONS
        self.rescore_with_objectness = s.RESCORE_WITH_OBJECTNESS and s.LOSS.OBJECTNESS_LOSS != "none"
        self.rescore_with_mask = s.RESCORE_WITH_MASK

    def flops_forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network only (no pre/post-processing): normalized ``(B, 3, H, W)`` -> decoder outputs."""
        return self.decoder(self.encoder(self.backbone(images)))

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        outputs = self.flops_forward(images)
        if self.training:
            targets = []
            for x in batched_inputs:
                if "instances" not in x:
                    raise KeyError("training inputs need 'instances' (labels, masks); got keys " + str(sorted(x)))
                inst = x["instances"]
                targets.append({"labels": inst["labels"].to(self.device), "masks": inst["masks"].to(self.device)})
            return self.criterion(outputs, targets, tuple(images.shape[-2:]))
        return self.inference(outputs, batched_inputs, sizes, tuple(images.shape[-2:]))

    @torch.no_grad()
    def inference(self, outputs, batched_inputs, image_sizes, padded_size) -> List[Dict[str, torch.Tensor]]:
        probs = outputs["pred_logits"].float().sigmoid()
        if self.rescore_with_objectness:
            probs = torch.sqrt(probs * outputs["pred_scores"].float().sigmoid())
        mask_probs = outputs["pred_masks"].float().sigmoid()
        results = []
        for i, x in enumerate(batched_inputs):
            out_h, out_w = int(x.get("height", image_sizes[i][0])), int(x.get("width", image_sizes[i][1]))
            scores, labels = probs[i].max(dim=-1)
            keep = scores > self.cls_threshold
            scores, labels, m = scores[keep], labels[keep], mask_probs[i][keep]
            if scores.numel() > self.max_detections:
                top = scores.topk(self.max_detections).indices
                scores, labels, m = scores[top], labels[top], m[top]
            if self.rescore_with_mask and scores.numel():
                binary = (m > self.mask_threshold).float()
                scores = scores * (m * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            m = masks_to_original(m, padded_size, image_sizes[i], (out_h, out_w))
            masks = m > self.mask_threshold
            results.append({"scores": scores, "labels": labels, "masks": masks, "boxes": boxes_from_masks(masks)})
        return results
