"""QueryInst meta-architecture (Fang et al., "Instances as Queries", ICCV 2021): ResNet-FPN
backbone -> N learnable proposals refined by S stages of a query-based box head with parallel
dynamic mask heads.

Inference (official ``QueryRoIHead.simple_test``; docs/queryinst.md): sigmoid class scores of the last
stage, the top ``TEST.DETECTIONS_PER_IMAGE`` (query, class) pairs (official ``max_per_img``),
boxes of the last stage; the last stage's mask head runs once on the last stage's boxes; then the
shared RoI post-processing (:func:`instseg.modeling.roi_masks_to_instances`): the 28x28 mask of
the predicted class is pasted into its box as predicted (not clipped), at the original size
(``height``, ``width``), foreground where ``> MASK_THRESHOLD`` (0.5). No NMS, no score threshold.
Output boxes are rescaled to the original size and clipped to it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from instseg.config import configurable
from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, collect_targets, roi_masks_to_instances
from instseg.modeling.backbone import build_backbone

from .criterion import QueryInstCriterion
from .roi_head import QueryRoIHead

__all__ = ["QueryInst"]


@META_ARCH_REGISTRY.register()
class QueryInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses
    ``stage{t}_loss_{cls,bbox,giou,mask}``; eval -> one dict per image with ``scores`` ``(K,)``,
    ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)`` and ``boxes`` ``(K, 4)`` xyxy
    pixels at the original size (docs/architecture.md, data contract),
    ``K = min(detections_per_image, N x classes)``, sorted by descending score.

    Args:
        backbone: ResNet-FPN returning at least ``in_features``.
        roi_head: :class:`queryinst.roi_head.QueryRoIHead` (box stages and dynamic mask heads).
        criterion: :class:`queryinst.criterion.QueryInstCriterion`.
        in_features: FPN levels the RoI head pools from (``p2``..``p5``).
        pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold:
            :class:`instseg.modeling.MetaArchBase` (mask threshold 0.5, official).

    Raises:
        ValueError: ``MODEL.NUM_CLASSES`` not resolved (<= 0), or the backbone lacks one of
            ``MODEL.QUERY_INST.IN_FEATURES``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        roi_head: nn.Module,
        criterion: nn.Module,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        pixel_mean,
        pixel_std,
        size_divisibility: int = 32,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
    ):
        super().__init__(pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold)
        shapes = backbone.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.QUERY_INST.IN_FEATURES {missing} are not outputs of the backbone "
                f"({list(shapes)}); QueryInst needs an FPN backbone (build_resnet_fpn_backbone)"
            )
        self.backbone = backbone
        self.in_features = list(in_features)
        self.roi_head = roi_head
        self.criterion = criterion

    @classmethod
    def from_config(cls, cfg) -> Dict:
        if cfg.MODEL.NUM_CLASSES <= 0:
            raise ValueError(
                f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}: set it, or let the tools take it from DATASETS"
            )
        q = cfg.MODEL.QUERY_INST
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in q.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.QUERY_INST.IN_FEATURES {missing} are not outputs of {cfg.MODEL.BACKBONE.NAME} "
                f"({list(shapes)}); QueryInst needs an FPN backbone (build_resnet_fpn_backbone)"
            )
        return {
            **cls.base_config(cfg),
            "backbone": backbone,
            "roi_head": QueryRoIHead.from_config(cfg, [shapes[f].stride for f in q.IN_FEATURES]),
            "criterion": QueryInstCriterion.from_config(cfg),
            "in_features": list(q.IN_FEATURES),
            "mask_threshold": q.MASK_THRESHOLD,
        }

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

    def export_forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The exported graph (docs/deploy.md, "Export (ONNX)"): normalized ``(B, 3, Hp, Wp)`` and
        ``(B, 2)`` int64 unpadded ``(h, w)`` (the initial proposals use it, as in :meth:`forward`)
        -> the last stage per query: ``scores`` ``(B, N, K)`` (sigmoid of the class logits),
        ``boxes`` ``(B, N, 4)`` xyxy input pixels and ``pred_masks`` ``(B, N, K, 2S, 2S)``, the
        mask logits of every class (the mask head runs on all ``N`` boxes; it is per RoI, so a
        query's mask is the one :meth:`inference` computes for the selected queries alone). The
        top-k over (query, class) stays in :meth:`export_postprocess`: selecting in the graph
        would make the outputs' order depend on near-equal scores."""
        features = self._features(images)
        stages = self.roi_head.forward_boxes(features, image_sizes)
        last = stages[-1]
        b, n, k = last["logits"].shape
        idx = [torch.arange(n, device=images.device)] * b
        masks = self.roi_head.forward_masks(len(stages) - 1, features, list(last["boxes"]), idx, stages)
        return {"scores": last["logits"].float().sigmoid(), "boxes": last["boxes"],
                "pred_masks": masks.reshape(b, n, k, masks.shape[-2], masks.shape[-1])}

    @torch.no_grad()
    def export_postprocess(self, outputs, batched_inputs, image_sizes, padded_size) -> List[Dict[str, torch.Tensor]]:
        """:meth:`export_forward`'s outputs -> the data-contract dicts: the top-k (query, class)
        pairs and their masks pasted into the boxes at the original size, as :meth:`inference`."""
        results = []
        for i, x in enumerate(batched_inputs):
            scores = torch.as_tensor(outputs["scores"][i]).float()  # (N, K)
            n, k = scores.shape
            top, flat_idx = scores.flatten().topk(min(self.detections_per_image, n * k))
            query_idx, labels = flat_idx // k, flat_idx % k
            probs = torch.as_tensor(outputs["pred_masks"][i])[query_idx, labels].float().sigmoid()
            h_in, w_in = image_sizes[i]
            out_size = (int(x.get("height", h_in)), int(x.get("width", w_in)))
            results.append(roi_masks_to_instances(
                probs, top, labels, torch.as_tensor(outputs["boxes"][i]).float()[query_idx], (h_in, w_in), out_size,
                mask_threshold=self.mask_threshold,
            ))
        return results

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        image_sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        features = self._features(images)
        stages = self.roi_head.forward_boxes(features, image_sizes)
        if self.training:
            targets = collect_targets(batched_inputs, ("labels", "boxes", "masks"), self.device)
            return self.criterion(self.roi_head, features, stages, image_sizes, targets, tuple(images.shape[-2:]))
        return self.inference(features, stages, batched_inputs, sizes)

    @torch.no_grad()
    def internals(self, batched_inputs: List[Dict], score_threshold: float = 0.5) -> List[Dict]:
        """Per image the result of ``self(batched_inputs)`` and ``S + 1`` ``"boxes"`` panels: the
        learnable proposal boxes of the kept queries (the input of stage 1), then their boxes
        ``b_t`` after each stage ``t = 1..S`` of the query-based cascade (Sparse R-CNN), in
        original pixels, not clipped, one panel per stage; the last stage's boxes clipped to the
        image are the output boxes. Kept: :func:`instseg.modeling.internals.select_kept`. See
        :meth:`instseg.modeling.MetaArchBase.internals`."""
        from instseg.modeling.internals import boxes_panel, input_to_original, select_kept

        self._check_internals_mode()
        images, sizes = self.preprocess_images(batched_inputs)
        image_sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        features = self._features(images)
        stages = self.roi_head.forward_boxes(features, image_sizes)
        query_indices: List[torch.Tensor] = []
        results = self.inference(features, stages, batched_inputs, sizes, query_indices=query_indices)
        proposals = self.roi_head.initial_proposals(image_sizes)[0]
        out = []
        for i, (res, x) in enumerate(zip(results, batched_inputs)):
            out_size = (int(x.get("height", sizes[i][0])), int(x.get("width", sizes[i][1])))
            rows = select_kept(res["scores"], score_threshold)
            q = query_indices[i][rows.to(query_indices[i].device)]
            per_stage = [("proposals (input of stage 1)", proposals[i])] + [
                (f"stage {t + 1} of {len(stages)} boxes", st["boxes"][i]) for t, st in enumerate(stages)]
            out.append({"result": res, "panels": [
                boxes_panel(title, input_to_original(b[q], sizes[i], out_size), instances=rows)
                for title, b in per_stage]})
        return out

    @torch.no_grad()
    def inference(self, features, stages, batched_inputs, image_sizes,
                  query_indices: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Top-k over (query, class), masks of the last stage pasted at the original size. When
        ``query_indices`` is a list, the int64 ``(K,)`` query of each result row is appended to
        it per image (for :meth:`internals`)."""
        last = stages[-1]
        scores_all = last["logits"].float().sigmoid()  # (B, N, K)
        b, n, k = scores_all.shape
        topk = min(self.detections_per_image, n * k)
        flat_scores, flat_idx = scores_all.flatten(1).topk(topk, dim=1)  # sorted, highest first
        query_idx, labels = flat_idx // k, flat_idx % k
        if query_indices is not None:
            query_indices.extend(query_idx)
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
            out_size = (int(x.get("height", h_in)), int(x.get("width", w_in)))
            probs = m[inv, labels[i]].float().sigmoid()  # (topk, 28, 28)
            results.append(roi_masks_to_instances(
                probs, flat_scores[i], labels[i], last["boxes"][i][query_idx[i]], (h_in, w_in), out_size,
                mask_threshold=self.mask_threshold,
            ))
        return results
