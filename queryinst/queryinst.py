"""QueryInst meta-architecture (Fang et al., "Instances as Queries", ICCV 2021): ResNet-FPN
backbone -> N learnable proposals refined by S stages of a query-based box head with parallel
dynamic mask heads.

Inference (official ``QueryRoIHead.simple_test``; docs/queryinst.md): sigmoid class scores of the last
stage, top-k over (query, class) pairs (k = N unless ``MAX_DETECTIONS``), boxes of the last stage;
the last stage's mask head runs once on the last stage's boxes; the 28x28 mask of the predicted
class is pasted into the image at its original size (``height``, ``width``) and thresholded at 0.5.
No NMS, no score threshold. Output boxes are rescaled to the original size and clipped to it.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase
from instseg.modeling.backbone import build_backbone

from .criterion import QueryInstCriterion
from .paste import paste_masks_in_image
from .roi_head import QueryRoIHead

__all__ = ["QueryInst"]


@META_ARCH_REGISTRY.register()
class QueryInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses
    ``stage{t}_loss_{cls,bbox,giou,mask}``; eval -> one dict per image with ``scores`` ``(K,)``,
    ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)`` and ``boxes`` ``(K, 4)`` xyxy
    pixels at the original size (docs/architecture.md, Data contract).

    Raises:
        ValueError: ``MODEL.NUM_CLASSES`` not resolved (<= 0), or the backbone lacks one of
            ``MODEL.QUERY_INST.IN_FEATURES``.
    """

    def __init__(self, cfg):
        super().__init__(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.SIZE_DIVISIBILITY)
        if cfg.MODEL.NUM_CLASSES <= 0:
            raise ValueError(
                f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}: set it, or let the tools take it from DATASETS"
            )
        q = cfg.MODEL.QUERY_INST
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        missing = [f for f in q.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.QUERY_INST.IN_FEATURES {missing} are not outputs of {cfg.MODEL.BACKBONE.NAME} "
                f"({list(shapes)}); QueryInst needs an FPN backbone (build_resnet_fpn_backbone)"
            )
        self.in_features = list(q.IN_FEATURES)
        self.roi_head = QueryRoIHead.from_config(cfg, [shapes[f].stride for f in self.in_features])
        self.criterion = QueryInstCriterion.from_config(cfg)
        self.num_classes = cfg.MODEL.NUM_CLASSES
        self.max_detections = q.MAX_DETECTIONS if q.MAX_DETECTIONS > 0 else q.NUM_PROPOSALS
        self.mask_threshold = q.MASK_THRESHOLD

    def _features(self, images: torch.Tensor) -> List[torch.Tensor]:
        feats = self.backbone(images)
        return [feats[f] for f in self.in_features]

    def flops_forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network only, as the official ``forward_dummy`` plus the final mask head: normalized
        ``(B, 3, H, W)`` -> ``pred_logits`` ``(B, N, K)``, ``pred_boxes`` ``(B, N, 4)`` and
        ``pred_masks`` ``(B*N, K, 28, 28)`` (the last stage's mask head on all N boxes)."""
        features = self._features(images)
        b = images.shape[0]
        sizes = torch.tensor([list(images.shape[-2:])] * b, device=images.device)
        stages = self.roi_head.forward_boxes(features, sizes)
        last = stages[-1]
        n = last["boxes"].shape[1]
        idx = [torch.arange(n, device=images.device)] * b
        masks = self.roi_head.forward_masks(len(stages) - 1, features, list(last["boxes"]), idx, stages)
        return {"pred_logits": last["logits"], "pred_boxes": last["boxes"], "pred_masks": masks}

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        image_sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        features = self._features(images)
        stages = self.roi_head.forward_boxes(features, image_sizes)
        if self.training:
            targets = []
            for x in batched_inputs:
                if "instances" not in x:
                    raise KeyError("training inputs need 'instances' (labels, boxes, masks); got keys " + str(sorted(x)))
                inst = x["instances"]
                missing = [k for k in ("labels", "boxes", "masks") if k not in inst]
                if missing:
                    raise KeyError(f"QueryInst training 'instances' lack {missing}")
                targets.append({k: inst[k].to(self.device) for k in ("labels", "boxes", "masks")})
            return self.criterion(self.roi_head, features, stages, image_sizes, targets)
        return self.inference(features, stages, batched_inputs, sizes)

    @torch.no_grad()
    def inference(self, features, stages, batched_inputs, image_sizes) -> List[Dict[str, torch.Tensor]]:
        """Top-k over (query, class), masks of the last stage pasted at the original size."""
        last = stages[-1]
        scores_all = last["logits"].float().sigmoid()  # (B, N, K)
        b, n, k = scores_all.shape
        topk = min(self.max_detections, n * k)
        flat_scores, flat_idx = scores_all.flatten(1).topk(topk, dim=1)  # sorted, highest first
        query_idx, labels = flat_idx // k, flat_idx % k
        # the mask head runs once per selected query (a query may be selected for several classes)
        uniq = [qi.unique(return_inverse=True) for qi in query_idx]
        boxes_in = [last["boxes"][i][u] for i, (u, _) in enumerate(uniq)]
        mask_logits = self.roi_head.forward_masks(len(stages) - 1, features, boxes_in, [u for u, _ in uniq], stages)
        results, start = [], 0
        for i, x in enumerate(batched_inputs):
            u, inv = uniq[i]
            m = mask_logits[start : start + len(u)]
            start += len(u)
            h_in, w_in = image_sizes[i]
            out_h, out_w = int(x.get("height", h_in)), int(x.get("width", w_in))
            scale = torch.tensor([out_w / w_in, out_h / h_in] * 2, device=m.device)
            boxes = last["boxes"][i][query_idx[i]].float() * scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
            probs = m[inv, labels[i]].float().sigmoid()  # (topk, 28, 28)
            masks = paste_masks_in_image(probs, boxes, (out_h, out_w), self.mask_threshold)
            results.append({"scores": flat_scores[i], "labels": labels[i], "masks": masks, "boxes": boxes})
        return results
