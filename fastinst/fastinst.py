"""FastInst meta-architecture (He et al., "FastInst: A Simple Query-Based Model for Real-Time
Instance Segmentation", CVPR 2023): backbone -> PPM-FPN pixel decoder -> IA-guided queries ->
dual-path Transformer decoder.

Module layout follows the official code so that official checkpoints convert with a prefix table
(``fastinst/convert.py``, registered with :func:`instseg.convert.register_key_table`):
``backbone``, ``sem_seg_head.pixel_decoder`` (:class:`fastinst.ppm_fpn.PPMFPN`),
``sem_seg_head.predictor`` (the decoder), ``criterion``. As in the official code the decoder also holds the criterion (its matcher is needed
for GT-mask-guided learning), so its ``empty_weight`` buffer appears under both names.

Inference (official ``instance_inference``): softmax over K + 1 classes without the no-object
column, the top ``TEST.DETECTIONS_PER_IMAGE`` (100) (query, class) pairs of all N_a x K, no NMS;
then the shared dense post-processing (:func:`instseg.modeling.dense_masks_to_instances`): mask
logits bilinearly upsampled to the padded input, cropped, resized to the original image;
mask = sigmoid > ``MODEL.FASTINST.MASK_THRESHOLD`` (0.5); score x mean mask probability inside
the mask.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from instseg.config import configurable
from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, collect_targets, dense_masks_to_instances, select_top
from instseg.modeling.backbone import build_backbone

from .criterion import FastInstCriterion
from .ppm_fpn import PPMFPN
from .transformer_decoder import build_transformer_decoder

__all__ = ["FastInst", "FastInstHead"]


class FastInstHead(nn.Module):
    """``pixel_decoder`` (PPM-FPN) + ``predictor`` (Transformer decoder), official names.

    ``forward(features, targets=None)``: backbone features ``{res3, res4, res5}`` -> the decoder's
    output dict (see :meth:`fastinst.dual_path_decoder.FastInstDecoder.forward`).
    """

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape, criterion=None) -> "FastInstHead":
        """Raises ValueError: the pixel decoder's width differs from the decoder's, or it does not
        read 3 levels."""
        fi = cfg.MODEL.FASTINST
        if fi.PIXEL_DECODER.CONVS_DIM != fi.HIDDEN_DIM:
            raise ValueError(
                f"MODEL.FASTINST.PIXEL_DECODER.CONVS_DIM ({fi.PIXEL_DECODER.CONVS_DIM}) must equal "
                f"MODEL.FASTINST.HIDDEN_DIM ({fi.HIDDEN_DIM}): pixel features enter the decoder unprojected"
            )
        if len(fi.PIXEL_DECODER.IN_FEATURES) != 3:
            raise ValueError(f"the pixel decoder needs 3 levels (E3, E4, E5), got {list(fi.PIXEL_DECODER.IN_FEATURES)}")
        return cls(PPMFPN.from_config(fi.PIXEL_DECODER, input_shape), build_transformer_decoder(cfg, criterion),
                   cfg.MODEL.NUM_CLASSES)

    def forward(self, features: Dict[str, torch.Tensor], targets=None) -> Dict:
        return self.predictor(self.pixel_decoder(features), targets)


@META_ARCH_REGISTRY.register()
class FastInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses; eval -> one dict per
    image with ``scores`` ``(K,)``, ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)``
    and ``boxes`` ``(K, 4)`` xyxy pixels (the masks' tight boxes) at the original size,
    ``K = min(detections_per_image, N_a x classes)``.

    Args:
        backbone: returns ``{res3, res4, res5}``.
        sem_seg_head: :class:`FastInstHead` (PPM-FPN + decoder); its decoder holds ``criterion``
            (official layout: the matcher is needed for GT-mask-guided learning).
        criterion: :class:`fastinst.criterion.FastInstCriterion`.
        pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold:
            :class:`instseg.modeling.MetaArchBase` (mask threshold 0.5, official).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        pixel_mean,
        pixel_std,
        size_divisibility: int = 32,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
    ):
        super().__init__(pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold)
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion

    @classmethod
    def from_config(cls, cfg) -> Dict:
        if cfg.MODEL.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.NUM_CLASSES must be >= 1, got {cfg.MODEL.NUM_CLASSES} (-1 is resolved by the tools)")
        backbone = build_backbone(cfg)
        criterion = FastInstCriterion.from_config(cfg)
        return {
            **cls.base_config(cfg),
            "backbone": backbone,
            "sem_seg_head": FastInstHead.from_config(cfg, backbone.output_shape(), criterion),
            "criterion": criterion,
            "mask_threshold": cfg.MODEL.FASTINST.MASK_THRESHOLD,
        }

    def flops_forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network only (no pre/post-processing): normalized ``(B, 3, H, W)`` -> decoder outputs."""
        out = self.sem_seg_head(self.backbone(images))
        return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}

    @staticmethod
    def prepare_targets(batched_inputs: Sequence[Dict], padded_size, device) -> List[Dict[str, torch.Tensor]]:
        """Per image ``{"labels": int64 (M,), "masks": bool (M, Hp, Wp)}``, masks zero-padded to the
        padded batch (official ``prepare_targets``).

        Raises:
            KeyError: an input lacks ``"instances"``.
            ValueError: masks larger than the padded image or labels/masks counts differ.
        """
        hp, wp = padded_size
        targets = []
        for t in collect_targets(batched_inputs, ("labels", "masks"), device):
            labels, masks = t["labels"], t["masks"]
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"instances: {labels.shape[0]} labels but masks of shape {tuple(masks.shape)}")
            h, w = masks.shape[-2:]
            if h > hp or w > wp:
                raise ValueError(f"instance masks {h}x{w} larger than the padded image {hp}x{wp}")
            padded = torch.zeros((masks.shape[0], hp, wp), dtype=torch.bool, device=device)
            padded[:, :h, :w] = masks.bool()
            targets.append({"labels": labels.long(), "masks": padded})
        return targets

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_images(batched_inputs)
        features = self.backbone(images)
        padded = tuple(images.shape[-2:])
        if self.training:
            targets = self.prepare_targets(batched_inputs, padded, self.device)
            outputs = self.sem_seg_head(features, targets)
            return self.criterion(outputs, targets)
        outputs = self.sem_seg_head(features)
        return self.inference(outputs, batched_inputs, sizes, padded)

    @torch.no_grad()
    def inference(self, outputs, batched_inputs, image_sizes, padded_size) -> List[Dict[str, torch.Tensor]]:
        probs = F.softmax(outputs["pred_logits"].float(), dim=-1)[..., :-1]  # (B, N, K)
        mask_logits = outputs["pred_masks"].float()
        k = probs.shape[2]
        results = []
        for i, x in enumerate(batched_inputs):
            out_h, out_w = int(x.get("height", image_sizes[i][0])), int(x.get("width", image_sizes[i][1]))
            scores, idx = select_top(probs[i], self.detections_per_image)
            labels = idx % k
            queries = torch.div(idx, k, rounding_mode="floor")
            # upsample each selected query once, even when it is kept with several classes
            uniq, inverse = torch.unique(queries, return_inverse=True)
            duplicates = uniq.numel() < queries.numel()
            results.append(dense_masks_to_instances(
                mask_logits[i][uniq if duplicates else queries], scores, labels, padded_size, image_sizes[i],
                (out_h, out_w), mask_threshold=self.mask_threshold, maps_are_logits=True, rescore_with_mask=True,
                index=inverse if duplicates else None,
            ))
        return results
