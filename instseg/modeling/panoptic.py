"""Semantic and panoptic inference of a query-based mask model (set of (class, mask) predictions).

Mask2Former's rules (``mask2former/maskformer_model.py``, ``MaskFormer.semantic_inference`` and
``MaskFormer.panoptic_inference``, facebookresearch/Mask2Former), which FastInst's supplement
(App. C) follows for its Cityscapes panoptic / semantic results ("according to the practice of
Mask2Former"). Own code, same semantics; the functions take one image's raw network outputs:

* ``mask_cls``: class logits ``(Q, C + 1)``, the last column is "no object";
* ``mask_pred``: mask logits ``(Q, H, W)`` (at whatever size the caller wants the result).

Nothing here names a model. :func:`query_segmentation_outputs` is the per-image step of
Mask2Former's ``MaskFormer.forward`` at inference (resizing, then the tasks switched on), which a
query-based meta-architecture calls (FastInst, ``MODEL.FASTINST.TEST.*``); the thing classes of a
dataset come from its metadata (:func:`thing_ids_from_metadata`). See docs/panoptic_semantic.md.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["semantic_inference", "panoptic_inference", "query_segmentation_outputs", "thing_ids_from_metadata"]

#: Mask2Former's panoptic configs (``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD`` / ``OVERLAP_THRESHOLD``)
DEFAULT_OBJECT_MASK_THRESHOLD = 0.8
DEFAULT_OVERLAP_THRESHOLD = 0.8


def _check(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> None:
    if mask_cls.dim() != 2 or mask_cls.shape[1] < 2:
        raise ValueError(f"mask_cls must be (Q, C + 1) class logits with C >= 1, got {tuple(mask_cls.shape)}")
    if mask_pred.dim() != 3 or mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(f"mask_pred must be (Q, H, W) mask logits with Q = {mask_cls.shape[0]} "
                         f"(from mask_cls), got {tuple(mask_pred.shape)}")


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class semantic scores: ``sum_q softmax(mask_cls)[q, c] * sigmoid(mask_pred)[q]``.

    Mask2Former ``MaskFormer.semantic_inference``: softmax over the ``C + 1`` logits, the
    no-object column dropped, einsum ``"qc,qhw->chw"`` with the sigmoid mask probabilities.

    Args:
        mask_cls: float ``(Q, C + 1)`` class logits (last column = no object).
        mask_pred: float ``(Q, H, W)`` mask logits.

    Returns:
        float ``(C, H, W)`` (dtype of the inputs' promotion), not normalized over classes; the
        predicted label of a pixel is its argmax over ``C``.

    Raises:
        ValueError: shapes other than the above.
    """
    _check(mask_cls, mask_pred)
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float = DEFAULT_OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation of one image from query predictions (Mask2Former's rule).

    Mask2Former ``MaskFormer.panoptic_inference``:

    1. score, class of each query = max / argmax of ``softmax(mask_cls)`` over all ``C + 1``
       columns; a query is kept when its class is not no-object (``C``) and its score is
       **strictly above** ``object_mask_threshold``;
    2. every pixel goes to the kept query with the highest ``score * sigmoid(mask)`` (argmax; ties
       to the lower query index, as ``torch.argmax``);
    3. for each kept query ``k`` in query order: ``mask_area`` = pixels it wins (step 2, whatever
       its probability), ``original_area`` = pixels with ``sigmoid(mask) >= 0.5``, its segment =
       pixels it wins **and** with ``sigmoid(mask) >= 0.5``. It is dropped unless ``mask_area``,
       ``original_area`` and the segment are all > 0 and ``mask_area / original_area >=
       overlap_threshold``;
    4. a stuff class (not in ``thing_ids``) gets one segment: later queries of the same class
       paint their pixels with the first one's id; things keep one id per query.

    Args:
        mask_cls: float ``(Q, C + 1)`` class logits (last column = no object).
        mask_pred: float ``(Q, H, W)`` mask logits, at the output size.
        thing_ids: the contiguous class ids (``0..C-1``) that are things; the others are stuff.
        object_mask_threshold: Mask2Former's ``OBJECT_MASK_THRESHOLD`` (its panoptic configs: 0.8).
        overlap_threshold: Mask2Former's ``OVERLAP_THRESHOLD`` (its panoptic configs: 0.8).

    Returns:
        ``(panoptic_seg, segments_info)``: ``panoptic_seg`` int32 ``(H, W)`` on ``mask_pred``'s
        device, segment ids ``1..N``, 0 = void (no segment); ``segments_info`` a list of
        ``{"id": int, "isthing": bool, "category_id": int}`` (contiguous class id), in id order.

    Raises:
        ValueError: shapes other than the above.
    """
    _check(mask_cls, mask_pred)
    num_classes = mask_cls.shape[1] - 1
    things = {int(t) for t in thing_ids}
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()

    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_ids: Dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        isthing = cls in things
        wins = winner == k
        mask_area = int(wins.sum())
        fg = cur_masks[k] >= 0.5
        original_area = int(fg.sum())
        segment = wins & fg
        if mask_area == 0 or original_area == 0 or not bool(segment.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and cls in stuff_ids:
            panoptic_seg[segment] = stuff_ids[cls]
            continue
        next_id += 1
        if not isthing:
            stuff_ids[cls] = next_id
        panoptic_seg[segment] = next_id
        segments_info.append({"id": next_id, "isthing": bool(isthing), "category_id": cls})
    return panoptic_seg, segments_info


def thing_ids_from_metadata(dataset_name: str) -> List[int]:
    """The contiguous ids of the thing classes of a registered dataset: the values of its metadata's
    ``thing_dataset_id_to_contiguous_id`` (Mask2Former's ``panoptic_inference`` reads the same),
    sorted. For a panoptic dataset the contiguous ids cover things and stuff together (e.g.
    Cityscapes: the trainIds 11..18 are things, 0..10 stuff).

    Raises:
        ValueError: the dataset's metadata has no ``thing_dataset_id_to_contiguous_id`` (named).
    """
    from instseg.data import MetadataCatalog

    mapping = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id")
    if not mapping:
        raise ValueError(
            f"dataset {dataset_name!r} has no 'thing_dataset_id_to_contiguous_id' metadata: panoptic "
            "inference needs to know which classes are things (register a panoptic dataset, e.g. "
            "cityscapes_fine_panoptic_train or coco_2017_train_panoptic)")
    return sorted(int(v) for v in mapping.values())


def query_segmentation_outputs(
    mask_cls: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    *,
    semantic_on: bool,
    panoptic_on: bool,
    postprocess_before_inference: bool,
    thing_ids: Optional[Sequence[int]] = None,
    object_mask_threshold: float = DEFAULT_OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
) -> Dict:
    """Semantic and / or panoptic outputs of one image from its query predictions, as
    Mask2Former's ``MaskFormer.forward`` does at inference (and the official FastInst ``forward``).

    The mask logits of **all** queries are bilinearly upsampled to the padded input size
    (``align_corners=False``). With ``postprocess_before_inference`` they are then cropped to
    ``image_size`` and resized to ``output_size`` (Detectron2's ``sem_seg_postprocess``) and both
    tasks run at the output size; without it (semantic only) :func:`semantic_inference` runs at
    the padded size and its ``(C, Hp, Wp)`` result is cropped and resized. Memory: ``Q x height x
    width`` floats per image (Mask2Former's cost; 800 MB for 100 queries at 1024 x 2048).

    Args:
        mask_cls: ``(Q, C + 1)`` class logits of one image.
        mask_logits: ``(Q, h, w)`` mask logits at a stride of the padded input.
        padded_size: ``(Hp, Wp)`` of the padded batch (pixels).
        image_size: ``(H, W)`` of this image after the test resize, before padding.
        output_size: ``(height, width)``, the original image size.
        semantic_on, panoptic_on: which outputs to compute.
        postprocess_before_inference: see above (``True`` is required for panoptic).
        thing_ids: contiguous thing class ids (panoptic; :func:`thing_ids_from_metadata`).
        object_mask_threshold, overlap_threshold: :func:`panoptic_inference`.

    Returns:
        ``{"sem_seg": float (C, height, width)}`` when ``semantic_on``; ``{"panoptic_seg": int32
        (height, width), "segments_info": [...]}`` when ``panoptic_on`` (both when both).

    Raises:
        ValueError: panoptic without ``postprocess_before_inference`` or without ``thing_ids``.
    """
    from .postprocessing import masks_to_original

    out: Dict = {}
    if not (semantic_on or panoptic_on):
        return out
    if panoptic_on and not postprocess_before_inference:
        raise ValueError("panoptic inference runs on masks at the output size: postprocess_before_inference must be True")
    if panoptic_on and thing_ids is None:
        raise ValueError("panoptic inference needs thing_ids (the contiguous ids of the thing classes)")
    mask_cls = mask_cls.float()
    mask_logits = mask_logits.float()
    if postprocess_before_inference:
        masks = masks_to_original(mask_logits, padded_size, image_size, output_size)
        if semantic_on:
            out["sem_seg"] = semantic_inference(mask_cls, masks)
        if panoptic_on:
            seg, info = panoptic_inference(mask_cls, masks, thing_ids, object_mask_threshold, overlap_threshold)
            out["panoptic_seg"], out["segments_info"] = seg, info
        return out
    masks = F.interpolate(mask_logits[:, None], size=tuple(padded_size), mode="bilinear", align_corners=False)[:, 0]
    sem = semantic_inference(mask_cls, masks)
    out["sem_seg"] = masks_to_original(sem, padded_size, image_size, output_size)
    return out
