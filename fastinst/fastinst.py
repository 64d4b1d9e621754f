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

Semantic and panoptic inference (supplement App. C, Table V; official ``semantic_inference`` /
``panoptic_inference``, Mask2Former's rules): switched on by ``MODEL.FASTINST.TEST.SEMANTIC_ON`` /
``PANOPTIC_ON`` (``INSTANCE_ON`` switches the instance outputs), computed by
:func:`instseg.modeling.panoptic.query_segmentation_outputs`. With ``PANOPTIC_ON`` the thing
classes come from the metadata of ``DATASETS.TRAIN[0]`` (else ``DATASETS.TEST[0]``) and the
instance outputs keep only thing classes (official: the top-k pairs first, then the filter, so
fewer than ``TEST.DETECTIONS_PER_IMAGE`` may remain). Training is the same for the three tasks:
the targets are (class, mask) sets (semantic: one per class present; panoptic: one per stuff
class and per thing instance), built by the dataset mapper (``INPUT.DATASET_MAPPER_NAME``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from instseg.config import configurable
from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, collect_targets, dense_masks_to_instances, select_top
from instseg.modeling.backbone import build_backbone
from instseg.modeling.panoptic import query_segmentation_outputs, thing_ids_from_metadata

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
        semantic_on, instance_on, panoptic_on: the outputs at inference (``MODEL.FASTINST.TEST.*``;
            at least one). Eval-mode output dict: the instance keys when ``instance_on``, plus
            ``"sem_seg"`` float ``(K, height, width)`` (class probability x mask probability summed
            over queries) when ``semantic_on``, plus ``"panoptic_seg"`` int32 ``(height, width)``
            (segment ids, 0 = void) and ``"segments_info"`` (``[{"id", "isthing",
            "category_id"}]``, contiguous ids) when ``panoptic_on``.
        object_mask_threshold, overlap_threshold: panoptic rules (0.8, 0.8; official defaults).
        sem_seg_postprocess_before_inference: resize all query masks to the output size before
            semantic inference (implied by instance_on or panoptic_on, as in the official code).
        thing_ids: contiguous ids of the thing classes (needed by panoptic_on).

    Raises:
        ValueError: no task on; panoptic on without ``thing_ids``.
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
        semantic_on: bool = False,
        instance_on: bool = True,
        panoptic_on: bool = False,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        sem_seg_postprocess_before_inference: bool = False,
        thing_ids=None,
    ):
        super().__init__(pixel_mean, pixel_std, size_divisibility, detections_per_image, mask_threshold)
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError("MODEL.FASTINST.TEST: SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON are all False; "
                             "switch on at least one task")
        if panoptic_on and thing_ids is None:
            raise ValueError("MODEL.FASTINST.TEST.PANOPTIC_ON needs the thing classes (thing_ids)")
        self.semantic_on, self.instance_on, self.panoptic_on = bool(semantic_on), bool(instance_on), bool(panoptic_on)
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.sem_seg_postprocess_before_inference = bool(sem_seg_postprocess_before_inference or instance_on or panoptic_on)
        self.thing_ids = None if thing_ids is None else [int(t) for t in thing_ids]

    @classmethod
    def from_config(cls, cfg) -> Dict:
        if cfg.MODEL.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.NUM_CLASSES must be >= 1, got {cfg.MODEL.NUM_CLASSES} (-1 is resolved by the tools)")
        backbone = build_backbone(cfg)
        criterion = FastInstCriterion.from_config(cfg)
        test = cfg.MODEL.FASTINST.TEST
        thing_ids = None
        if test.PANOPTIC_ON:
            names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
            if not names:
                raise ValueError("MODEL.FASTINST.TEST.PANOPTIC_ON needs a panoptic dataset in DATASETS.TRAIN or "
                                 "DATASETS.TEST (its metadata says which classes are things)")
            thing_ids = thing_ids_from_metadata(names[0])
        return {
            **cls.base_config(cfg),
            "backbone": backbone,
            "sem_seg_head": FastInstHead.from_config(cfg, backbone.output_shape(), criterion),
            "criterion": criterion,
            "mask_threshold": cfg.MODEL.FASTINST.MASK_THRESHOLD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "sem_seg_postprocess_before_inference": test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "thing_ids": thing_ids,
        }

    @property
    def output_tasks(self):
        return tuple(t for t, on in (("instances", self.instance_on), ("sem_seg", self.semantic_on),
                                     ("panoptic_seg", self.panoptic_on)) if on)

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
    def internals(self, batched_inputs: List[Dict], score_threshold: float = 0.5) -> List[Dict]:
        """Per image the result of ``self(batched_inputs)`` and, as in the supplement's Figures
        I-III:

        * a ``"points"`` panel: the ``N_a`` IA-guided query pixels (the E4 positions the instance
          activation-guided query proposal picks from the auxiliary classifier's score map,
          :func:`fastinst.query_proposal.select_query_pixels`), at the centres of their 1/16
          cells in original pixels, coloured by their score ``p_{i,k_i}`` (the best foreground
          probability), the kept instances' queries marked (absent with learnable queries);
        * a ``"heatmaps"`` panel: the query-to-pixel cross-attention of the last dual-path
          decoder layer (mean over heads, E3 at 1/8, each map divided by its maximum) of the kept
          instances' queries;
        * a ``"heatmaps"`` panel: the same for the ``N_b`` auxiliary queries (Figure III).

        The attention panels need the dual-path decoder (:class:`fastinst.dual_path_decoder.FastInstDecoder`);
        they are absent for the Mask2Former-light baseline. See
        :meth:`instseg.modeling.MetaArchBase.internals`.

        Raises:
            ValueError: the instance outputs are off (``MODEL.FASTINST.TEST.INSTANCE_ON``).
        """
        from instseg.modeling.internals import (crop_maps_to_image, heatmaps_panel, input_to_original,
                                                normalize_maps, points_panel, select_kept)

        self._check_internals_mode()
        if not self.instance_on:
            raise ValueError("FastInst.internals() shows instances: MODEL.FASTINST.TEST.INSTANCE_ON is False")
        decoder = self.sem_seg_head.predictor
        captured: Dict[str, torch.Tensor] = {}
        hooks = []
        if getattr(decoder, "ia_guided_queries", False):
            hooks.append(decoder.query_proposal.register_forward_hook(
                lambda m, i, o: captured.__setitem__("indices", o["indices"])))
        cross = getattr(decoder, "transformer_query_cross_attention_layers", None)
        if cross is not None:
            hooks.append(cross[-1].multihead_attn.register_forward_hook(
                lambda m, i, o: captured.__setitem__("attn", o[1])))
        try:
            images, sizes = self.preprocess_images(batched_inputs)
            padded = tuple(images.shape[-2:])
            outputs = self.sem_seg_head(self.backbone(images))
        finally:
            for h in hooks:
                h.remove()
        query_indices: List[torch.Tensor] = []
        results = self.inference(outputs, batched_inputs, sizes, padded, query_indices=query_indices)
        n_a = int(decoder.num_queries)
        h3, w3 = outputs["pred_masks"].shape[-2:]
        out = []
        for i, (res, x) in enumerate(zip(results, batched_inputs)):
            out_size = (int(x.get("height", sizes[i][0])), int(x.get("width", sizes[i][1])))
            rows = select_kept(res["scores"], score_threshold)
            queries = query_indices[i][rows.to(query_indices[i].device)]
            panels = []
            if "indices" in captured:
                logits = outputs["proposal_logits"][i].float()
                h4, w4 = logits.shape[-2:]
                probs = logits.softmax(0)[:-1].amax(0).flatten()  # p_{i,k_i}
                idx = captured["indices"][i]
                cx = (idx % w4).float().add(0.5) * (padded[1] / w4)
                cy = torch.div(idx, w4, rounding_mode="floor").float().add(0.5) * (padded[0] / h4)
                point_rows = torch.full((n_a,), -1, dtype=torch.int64)
                for r, q in reversed(list(zip(rows.tolist(), queries.tolist()))):
                    point_rows[q] = r  # the highest-scored kept row of a query wins
                panels.append(points_panel(
                    f"IA-guided queries (N_a = {n_a} of the 1/16 score map), colour: score",
                    input_to_original(torch.stack([cx, cy], 1), sizes[i], out_size), values=probs[idx],
                    instances=point_rows))
            if "attn" in captured:
                attn = captured["attn"][i].float().view(-1, h3, w3)  # (N_a + N_b, h3, w3)
                maps, extent = crop_maps_to_image(normalize_maps(attn[queries]), padded, sizes[i], out_size)
                panels.append(heatmaps_panel("last dual-path layer: query-to-pixel cross-attention", maps, extent,
                                             instances=rows))
                n_b = attn.shape[0] - n_a
                if n_b > 0:
                    maps, extent = crop_maps_to_image(normalize_maps(attn[n_a:]), padded, sizes[i], out_size)
                    panels.append(heatmaps_panel("auxiliary queries: cross-attention (last layer)", maps, extent,
                                                 labels=[f"auxiliary query {j}" for j in range(n_b)]))
            out.append({"result": res, "panels": panels})
        return out

    @torch.no_grad()
    def inference(self, outputs, batched_inputs, image_sizes, padded_size,
                  query_indices: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Decoder outputs -> one output dict per image (module docstring). When
        ``query_indices`` is a list and the instance outputs are on, the int64 ``(K,)`` query
        of each result row is appended to it per image (for :meth:`internals`)."""
        probs = F.softmax(outputs["pred_logits"].float(), dim=-1)[..., :-1]  # (B, N, K)
        mask_logits = outputs["pred_masks"].float()
        k = probs.shape[2]
        results = []
        for i, x in enumerate(batched_inputs):
            out_h, out_w = int(x.get("height", image_sizes[i][0])), int(x.get("width", image_sizes[i][1]))
            seg = query_segmentation_outputs(
                outputs["pred_logits"][i], mask_logits[i], padded_size, image_sizes[i], (out_h, out_w),
                semantic_on=self.semantic_on, panoptic_on=self.panoptic_on,
                postprocess_before_inference=self.sem_seg_postprocess_before_inference, thing_ids=self.thing_ids,
                object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold)
            if not self.instance_on:
                results.append(seg)
                continue
            scores, idx = select_top(probs[i], self.detections_per_image)
            labels = idx % k
            queries = torch.div(idx, k, rounding_mode="floor")
            if self.panoptic_on:  # official: only thing classes among the top-k pairs
                keep = torch.isin(labels, torch.tensor(self.thing_ids, device=labels.device))
                scores, labels, queries = scores[keep], labels[keep], queries[keep]
            if query_indices is not None:
                query_indices.append(queries)
            # upsample each selected query once, even when it is kept with several classes
            uniq, inverse = torch.unique(queries, return_inverse=True)
            duplicates = uniq.numel() < queries.numel()
            results.append(dense_masks_to_instances(
                mask_logits[i][uniq if duplicates else queries], scores, labels, padded_size, image_sizes[i],
                (out_h, out_w), mask_threshold=self.mask_threshold, maps_are_logits=True, rescore_with_mask=True,
                index=inverse if duplicates else None,
            ))
            results[-1].update(seg)
        return results
