"""SparseInst meta-architecture (Cheng et al., "Sparse Instance Activation for Real-Time Instance
Segmentation", CVPR 2022): backbone -> instance context encoder -> IAM-based decoder.

Inference (Sec. 3.6 and the official ``sparseinst/sparseinst.py``) has no NMS:
``score = sqrt(sigmoid(cls) * sigmoid(objectness))`` (Table 6 rescoring), max over classes, keep
scores above ``CLS_THRESHOLD`` (0.005), at most ``TEST.DETECTIONS_PER_IMAGE`` of them (the
highest; the official code keeps all, at most N = 100), multiply by the mean mask probability
inside the binarized mask (``MASK_THRESHOLD`` 0.45) at 1/4, then the shared dense
post-processing (:func:`instseg.modeling.dense_masks_to_instances`): upsample the mask
probabilities to the padded input, crop, resize to the original image, foreground where
``> 0.45``; boxes are the masks' tight boxes.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from instseg.config import configurable
from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, collect_targets, dense_masks_to_instances, select_top
from instseg.modeling.backbone import build_backbone

from .decoder import IAMDecoder
from .encoder import InstanceContextEncoder
from .loss import SparseInstCriterion

__all__ = ["SparseInst"]


@META_ARCH_REGISTRY.register()
class SparseInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses; eval -> one dict per
    image with ``scores`` ``(K,)``, ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)``
    and ``boxes`` ``(K, 4)`` xyxy pixels at the original size (docs/architecture.md, data contract),
    ``K <= detections_per_image``, sorted by descending score.

    Args:
        backbone: returns ``{res3, res4, res5}`` (a :class:`instseg.modeling.backbone.Backbone`).
        encoder: instance context encoder, features -> ``(B, C, H/8, W/8)``.
        decoder: IAM-based decoder (:class:`sparseinst.decoder.IAMDecoder`).
        criterion: :class:`sparseinst.loss.SparseInstCriterion`.
        cls_threshold: keep instances whose (rescored) class probability is above it
            (``MODEL.SPARSE_INST.CLS_THRESHOLD``, 0.005, official).
        rescore_with_objectness: ``sqrt(p * sigmoid(objectness))`` (Table 6).
        rescore_with_mask: times the mean mask probability inside the mask at 1/4 (official).
        pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold:
            :class:`instseg.modeling.MetaArchBase` (mask threshold 0.45, official).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        criterion: nn.Module,
        pixel_mean,
        pixel_std,
        size_divisibility: int = 32,
        detections_per_image: int = 100,
        mask_threshold: float = 0.45,
        cls_threshold: float = 0.005,
        rescore_with_objectness: bool = True,
        rescore_with_mask: bool = True,
    ):
        super().__init__(pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold)
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.criterion = criterion
        self.cls_threshold = float(cls_threshold)
        self.rescore_with_objectness = bool(rescore_with_objectness)
        self.rescore_with_mask = bool(rescore_with_mask)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        s = cfg.MODEL.SPARSE_INST
        backbone = build_backbone(cfg)
        encoder = InstanceContextEncoder.from_config(cfg, backbone.output_shape())
        return {
            **cls.base_config(cfg),
            "backbone": backbone,
            "encoder": encoder,
            "decoder": IAMDecoder.from_config(cfg, encoder.out_channels),
            "criterion": SparseInstCriterion.from_config(cfg),
            "mask_threshold": s.MASK_THRESHOLD,
            "cls_threshold": s.CLS_THRESHOLD,
            "rescore_with_objectness": s.RESCORE_WITH_OBJECTNESS and s.LOSS.OBJECTNESS_LOSS != "none",
            "rescore_with_mask": s.RESCORE_WITH_MASK,
        }

    def flops_forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network only (no pre/post-processing): normalized ``(B, 3, H, W)`` -> decoder outputs."""
        return self.decoder(self.encoder(self.backbone(images)))

    def iam_maps(self, iam: torch.Tensor) -> torch.Tensor:
        """The decoder's IAM output ``(B, N*G, H/8, W/8)`` (logits; attention weights for the
        ``cross_attention`` IAM) -> instance activation maps ``(B, N, H/8, W/8)`` in ``[0, 1]``:
        ``sigmoid`` of the logits (the activation the decoder aggregates with, Sec. 3.3), for
        ``softmax`` activation / cross-attention the pixel distribution divided by its maximum;
        Group-IAM (Sec. 3.4): the mean over the G group maps of an instance."""
        branch = self.decoder.inst_branch
        b, _, h, w = iam.shape
        if branch.iam_type == "cross_attention":
            maps = iam.float()
        elif branch.activation == "sigmoid":
            maps = iam.float().sigmoid()
        else:
            maps = torch.softmax(iam.float().flatten(2) + branch.softmax_bias, dim=-1).view(b, -1, h, w)
        if branch.groups > 1:
            maps = maps.view(b, branch.groups, -1, h, w).mean(1)
        if branch.iam_type == "cross_attention" or branch.activation != "sigmoid":
            maps = maps / maps.flatten(2).amax(-1).clamp(min=1e-12)[..., None, None]
        return maps

    @torch.no_grad()
    def internals(self, batched_inputs: List[Dict], score_threshold: float = 0.5) -> List[Dict]:
        """Per image the result of ``self(batched_inputs)`` and one ``"heatmaps"`` panel: the IAM
        (instance activation maps, :meth:`iam_maps`, ``(k, H/8, W/8)`` cropped to the image) of
        the kept instances (:func:`instseg.modeling.internals.select_kept`), the paper's Fig. 4.
        See :meth:`instseg.modeling.MetaArchBase.internals`."""
        from instseg.modeling.internals import crop_maps_to_image, heatmaps_panel, select_kept

        self._check_internals_mode()
        captured = {}
        hook = self.decoder.inst_branch.register_forward_hook(lambda m, i, o: captured.__setitem__("iam", o[3]))
        try:
            images, sizes = self.preprocess_images(batched_inputs)
            outputs = self.flops_forward(images)
        finally:
            hook.remove()
        padded = tuple(images.shape[-2:])
        query_indices: List[torch.Tensor] = []
        results = self.inference(outputs, batched_inputs, sizes, padded, query_indices=query_indices)
        maps = self.iam_maps(captured["iam"])
        groups = self.decoder.inst_branch.groups
        title = "IAM (instance activation maps, 1/8)" + (f", mean of {groups} groups" if groups > 1 else "")
        out = []
        for i, (res, x) in enumerate(zip(results, batched_inputs)):
            rows = select_kept(res["scores"], score_threshold)
            out_size = (int(x.get("height", sizes[i][0])), int(x.get("width", sizes[i][1])))
            m, extent = crop_maps_to_image(maps[i][query_indices[i][rows.to(maps.device)]], padded, sizes[i], out_size)
            out.append({"result": res, "panels": [heatmaps_panel(title, m, extent, instances=rows)]})
        return out

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        outputs = self.flops_forward(images)
        if self.training:
            targets = collect_targets(batched_inputs, ("labels", "masks"), self.device)
            return self.criterion(outputs, targets, tuple(images.shape[-2:]))
        return self.inference(outputs, batched_inputs, sizes, tuple(images.shape[-2:]))

    @torch.no_grad()
    def inference(self, outputs, batched_inputs, image_sizes, padded_size,
                  query_indices: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Decoder outputs -> one result dict per image (module docstring). When
        ``query_indices`` is a list, the int64 ``(K,)`` IAM / query index of each result row is
        appended to it per image (for :meth:`internals`)."""
        probs = outputs["pred_logits"].float().sigmoid()
        if self.rescore_with_objectness and "pred_scores" in outputs:
            probs = torch.sqrt(probs * outputs["pred_scores"].float().sigmoid())
        mask_probs = outputs["pred_masks"].float().sigmoid()
        results = []
        for i, x in enumerate(batched_inputs):
            out_h, out_w = int(x.get("height", image_sizes[i][0])), int(x.get("width", image_sizes[i][1]))
            scores, labels = probs[i].max(dim=-1)
            keep = (scores > self.cls_threshold).nonzero(as_tuple=True)[0]
            top_scores, top = select_top(scores[keep], self.detections_per_image)
            keep = keep[top]
            if query_indices is not None:
                query_indices.append(keep)
            scores, labels, m = top_scores, labels[keep], mask_probs[i][keep]
            if self.rescore_with_mask and scores.numel():
                binary = (m > self.mask_threshold).float()
                scores = scores * (m * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            results.append(dense_masks_to_instances(
                m, scores, labels, padded_size, image_sizes[i], (out_h, out_w),
                mask_threshold=self.mask_threshold, maps_are_logits=False,
            ))
        return results
