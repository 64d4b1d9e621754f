"""FastInst meta-architecture (He et al., "FastInst: A Simple Query-Based Model for Real-Time
Instance Segmentation", CVPR 2023): backbone -> PPM-FPN pixel decoder -> IA-guided queries ->
dual-path Transformer decoder.

Module layout follows the official code so that official checkpoints convert with a prefix table
(:data:`instseg.convert.MODEL_KEY_TABLES` ``"fastinst"``): ``backbone``, ``sem_seg_head.pixel_decoder``
(:class:`instseg.modeling.encoders.PPMFPN`), ``sem_seg_head.predictor`` (the decoder),
``criterion``. As in the official code the decoder also holds the criterion (its matcher is needed
for GT-mask-guided learning), so its ``empty_weight`` buffer appears under both names.

Inference (official ``instance_inference``): softmax over K + 1 classes without the no-object
column, the top ``TEST.DETECTIONS_PER_IMAGE`` (100) (query, class) pairs of all N_a x K, no NMS;
mask logits bilinearly upsampled to the padded input, cropped, resized to the original image;
mask = sigmoid > ``MASK_THRESHOLD`` (0.5); score x mean mask probability inside the mask.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, boxes_from_masks, masks_to_original
from instseg.modeling.backbone import build_backbone
from instseg.modeling.encoders import PPMFPN

from .criterion import FastInstCriterion
from .transformer_decoder import build_transformer_decoder

__all__ = ["FastInst", "FastInstHead"]


class FastInstHead(nn.Module):
    """``pixel_decoder`` (PPM-FPN) + ``predictor`` (Transformer decoder), official names.

    ``forward(features, targets=None)``: backbone features ``{res3, res4, res5}`` -> the decoder's
    output dict (see :meth:`fastinst.transformer_decoder.FastInstDecoder.forward`).
    """

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape) -> "FastInstHead":
        fi = cfg.MODEL.FASTINST
        if fi.PIXEL_DECODER.CONVS_DIM != fi.HIDDEN_DIM:
            raise ValueError(
                f"MODEL.FASTINST.PIXEL_DECODER.CONVS_DIM ({fi.PIXEL_DECODER.CONVS_DIM}) must equal "
                f"MODEL.FASTINST.HIDDEN_DIM ({fi.HIDDEN_DIM}): pixel features enter the decoder unprojected"
            )
        if len(fi.PIXEL_DECODER.IN_FEATURES) != 3:
            raise ValueError(f"the pixel decoder needs 3 levels (E3, E4, E5), got {list(fi.PIXEL_DECODER.IN_FEATURES)}")
        return cls(PPMFPN.from_config(fi.PIXEL_DECODER, input_shape), build_transformer_decoder(cfg), cfg.MODEL.NUM_CLASSES)

    def forward(self, features: Dict[str, torch.Tensor], targets=None) -> Dict:
        return self.predictor(self.pixel_decoder(features), targets)


@META_ARCH_REGISTRY.register()
class FastInst(MetaArchBase):
    """``model(batched_inputs)``: training -> dict of weighted scalar losses; eval -> one dict per
    image with ``scores`` ``(K,)``, ``labels`` int64 ``(K,)``, ``masks`` bool ``(K, height, width)``
    and ``boxes`` ``(K, 4)`` xyxy pixels (the masks' tight boxes) at the original size.
    """

    def __init__(self, cfg):
        super().__init__(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.SIZE_DIVISIBILITY)
        if cfg.MODEL.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.NUM_CLASSES must be >= 1, got {cfg.MODEL.NUM_CLASSES} (-1 is resolved by the tools)")
        fi = cfg.MODEL.FASTINST
        self.backbone = build_backbone(cfg)
        self.sem_seg_head = FastInstHead.from_config(cfg, self.backbone.output_shape())
        self.criterion = FastInstCriterion.from_config(cfg)
        self.sem_seg_head.predictor.criterion = self.criterion  # official layout (see module docstring)
        self.num_classes = cfg.MODEL.NUM_CLASSES
        self.max_detections = cfg.TEST.DETECTIONS_PER_IMAGE
        self.mask_threshold = fi.TEST.MASK_THRESHOLD
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"MODEL.FASTINST.TEST.MASK_THRESHOLD must be in (0, 1), got {self.mask_threshold}")

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
        for x in batched_inputs:
            if "instances" not in x:
                raise KeyError("training inputs need 'instances' (labels, masks); got keys " + str(sorted(x)))
            inst = x["instances"]
            labels, masks = inst["labels"].to(device), inst["masks"].to(device)
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
        n, k = probs.shape[1:]
        results = []
        for i, x in enumerate(batched_inputs):
            out_h, out_w = int(x.get("height", image_sizes[i][0])), int(x.get("width", image_sizes[i][1]))
            scores, idx = probs[i].flatten().topk(min(self.max_detections, n * k), sorted=True)
            labels = idx % k
            queries = torch.div(idx, k, rounding_mode="floor")
            # upsample each selected query once, even when it is kept with several classes
            uniq, inverse = torch.unique(queries, return_inverse=True)
            duplicates = uniq.numel() < queries.numel()
            sel = uniq if duplicates else queries
            probs_full = masks_to_original(mask_logits[i][sel], padded_size, image_sizes[i], (out_h, out_w)).sigmoid_()
            binary = probs_full > self.mask_threshold
            # mean probability inside the mask, in place (no second full-size float tensor)
            mask_scores = probs_full.masked_fill_(~binary, 0).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
            if duplicates:
                binary, mask_scores = binary[inverse], mask_scores[inverse]
            results.append({
                "scores": scores * mask_scores,
                "labels": labels,
                "masks": binary,
                "boxes": boxes_from_masks(binary),
            })
        return results
