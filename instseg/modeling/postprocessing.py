"""One post-processing for every model: network outputs -> the data contract's per-image results.

Two kinds of mask predictions reach it (docs/architecture.md, "Post-processing"):

* **dense** mask maps at a stride of the padded input (SparseInst, FastInst):
  :func:`dense_masks_to_instances` upsamples them to the padded input, crops the image, resizes to
  the original size, binarizes and takes the masks' tight boxes;
* **RoI** masks ``(K, M, M)`` relative to boxes (QueryInst, FASSST): :func:`roi_masks_to_instances`
  scales the boxes to the original size, pastes every mask into its box **as predicted** (not
  clipped to the image: mmdetection's and hustvl/QueryInst's ``_do_paste_mask``) in one batched
  call, binarizes, and clips only the returned boxes.

Rules shared by all four models, so that their outputs compare fairly:

* a pixel is foreground when its mask probability is **strictly above** ``mask_threshold``
  (:func:`binarize`; the official codes disagree: SparseInst and Mask2Former/FastInst use ``>``,
  mmdetection ``>=``; the two differ only for probabilities exactly at the threshold);
* at most ``TEST.DETECTIONS_PER_IMAGE`` instances per image, the highest scores, sorted by
  descending score (:func:`select_top`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "binarize",
    "boxes_from_masks",
    "dense_masks_to_instances",
    "masks_to_original",
    "paste_masks_in_boxes",
    "roi_masks_to_instances",
    "select_top",
]

# bytes of float32 working memory one paste chunk may use (Detectron2 bounds its GPU paste alike)
_PASTE_CHUNK_BYTES = 256 * 1024 * 1024


def binarize(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``probs > threshold`` as bool (the one mask threshold rule of every model)."""
    return probs > threshold


def select_top(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, numel)`` highest of the flattened ``scores``, sorted descending, and their flat
    indices (``TEST.DETECTIONS_PER_IMAGE`` for every model).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {k}")
    flat = scores.flatten()
    return flat.topk(min(int(k), flat.numel()), sorted=True)


def masks_to_original(
    mask_logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """Resize per-instance mask maps to the original image (Detectron2's post-processing).

    ``mask_logits`` ``(K, h, w)`` at a stride of the padded input is bilinearly upsampled to
    ``padded_size`` ``(Hp, Wp)``, cropped to the unpadded ``image_size`` (after augmentation) and
    bilinearly resized to ``output_size`` ``(height, width)``. Returns ``(K, height, width)`` in the
    input's dtype (values are not thresholded). When the crop already has ``output_size`` (no test
    resize) the second resize is skipped: a same-size bilinear resize is the identity.
    """
    if mask_logits.numel() == 0:
        return mask_logits.new_zeros((mask_logits.shape[0],) + tuple(output_size))
    x = F.interpolate(mask_logits[:, None], size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    if tuple(image_size) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[:, 0]


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``(K, 4)`` xyxy float boxes (pixels) of bool masks ``(K, H, W)``; empty masks give zeros.

    ``x2`` / ``y2`` are one past the last foreground pixel (the box covers the pixel, COCO
    convention): :func:`torchvision.ops.masks_to_boxes` + 1. Computed without a loop over the
    instances, from the per-row and per-column "any foreground" vectors (Detectron2's
    ``BitMasks.get_bounding_boxes`` reduces the same way): ``torchvision.ops.masks_to_boxes`` runs
    ``torch.where`` on every full-size mask in a Python loop, which dominated the post-processing
    of 100 kept instances at the original image size.
    """
    k = masks.shape[0]
    boxes = masks.new_zeros((k, 4), dtype=torch.float32)
    if masks.numel() == 0:
        return boxes
    masks = masks.bool()
    cols = masks.any(1)  # (K, W): columns with foreground
    rows = masks.any(2)  # (K, H): rows with foreground
    nonempty = cols.any(1)
    if not bool(nonempty.any()):
        return boxes
    w, h = cols.shape[1], rows.shape[1]
    # first True: argmax of the bool as uint8 (first maximum); last True: the same on the flipped vector
    x1 = cols.to(torch.uint8).argmax(1)
    x2 = w - cols.flip(1).to(torch.uint8).argmax(1)
    y1 = rows.to(torch.uint8).argmax(1)
    y2 = h - rows.flip(1).to(torch.uint8).argmax(1)
    b = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(nonempty[:, None], b, boxes)


def _taps(lo: torch.Tensor, hi: torch.Tensor, size: int, m: int, valid: torch.Tensor):
    """Bilinear taps of ``grid_sample(align_corners=False, padding_mode="zeros")`` along one axis.

    Output pixel ``i`` (centre ``i + 0.5``) of box ``[lo, hi]`` reads the ``m`` mask cells at the
    continuous index ``u = (i + 0.5 - lo) / (hi - lo) * m - 0.5``. Returns the two cell indices
    ``(K, size)`` (clamped into range) and their weights ``(K, size)`` (0 for cells outside the
    mask, and for invalid boxes).
    """
    centres = torch.arange(size, device=lo.device, dtype=torch.float32) + 0.5
    extent = torch.where(valid, hi - lo, torch.ones_like(hi))
    u = (centres[None] - lo[:, None]) / extent[:, None] * m - 0.5
    i0 = u.floor()
    w1 = u - i0
    w0 = 1.0 - w1
    i0 = i0.long()
    i1 = i0 + 1
    w0 = torch.where((i0 >= 0) & (i0 < m) & valid[:, None], w0, torch.zeros_like(w0))
    w1 = torch.where((i1 >= 0) & (i1 < m) & valid[:, None], w1, torch.zeros_like(w1))
    return i0.clamp(0, m - 1), i1.clamp(0, m - 1), w0, w1


def paste_masks_in_boxes(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int], threshold: Optional[float] = None
) -> torch.Tensor:
    """Paste box-relative masks into the image, all instances at once.

    Each ``(M, M)`` mask covers its box ``[x1, x2] x [y1, y2]`` (continuous pixel coordinates of the
    output image); pixel ``(x, y)`` (centre ``+ 0.5``) reads the mask bilinearly as
    ``grid_sample(align_corners=False, padding_mode="zeros")`` would (mmdetection's
    ``_do_paste_mask``), which is separable: the value is ``sum_ij wy_i wx_j m_ij`` with two taps
    per axis, i.e. ``Wy @ m @ Wx^T`` with one sparse-as-dense interpolation matrix per axis,
    computed as batched matrix products per chunk of instances (chunks bound the float working
    memory); no per-instance loop, no host synchronization. Boxes are used as given (they may
    extend past the image); boxes with ``x2 <= x1``, ``y2 <= y1`` or non-finite corners give empty masks.

    Args:
        masks: ``(K, M, M)`` float mask probabilities (or any maps; rectangular ``M_h x M_w`` too).
        boxes: ``(K, 4)`` xyxy in pixels of the output image.
        image_size: ``(H, W)`` of the output.
        threshold: ``None`` returns the pasted ``float32`` values; else a bool mask
            :func:`binarize`\\ d at it.

    Returns:
        ``(K, H, W)`` float32 (or bool).

    Raises:
        ValueError: ``masks`` is not 3-D or ``boxes`` is not ``(K, 4)``.
    """
    if masks.dim() != 3 or boxes.dim() != 2 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"expected masks (K, M, M) and boxes (K, 4), got {tuple(masks.shape)} and {tuple(boxes.shape)}")
    h, w = int(image_size[0]), int(image_size[1])
    k, mh, mw = masks.shape
    dtype = torch.bool if threshold is not None else torch.float32
    out = torch.zeros((k, h, w), dtype=dtype, device=masks.device)
    if k == 0 or h == 0 or w == 0:
        return out
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    valid = torch.isfinite(boxes).all(1) & (x2 > x1) & (y2 > y1)
    xi0, xi1, xw0, xw1 = _taps(x1, x2, w, mw, valid)  # (K, W)
    yi0, yi1, yw0, yw1 = _taps(y1, y2, h, mh, valid)  # (K, H)
    m = masks.float()
    # one interpolation matrix per axis and instance (two non-zeros per row), so the paste is
    # two batched matrix products: (c, H, Mh) @ (c, Mh, Mw) @ (c, Mw, W)
    chunk = max(1, _PASTE_CHUNK_BYTES // (4 * (2 * h * w + h * mh + w * mw + mh * w)))
    for s in range(0, k, chunk):
        e = min(s + chunk, k)
        c = e - s
        wx = m.new_zeros((c, w, mw))
        wx.scatter_add_(2, xi0[s:e, :, None], xw0[s:e, :, None]).scatter_add_(2, xi1[s:e, :, None], xw1[s:e, :, None])
        wy = m.new_zeros((c, h, mh))
        wy.scatter_add_(2, yi0[s:e, :, None], yw0[s:e, :, None]).scatter_add_(2, yi1[s:e, :, None], yw1[s:e, :, None])
        pasted = torch.bmm(wy, torch.bmm(m[s:e], wx.transpose(1, 2)))  # (c, H, W)
        out[s:e] = binarize(pasted, threshold) if threshold is not None else pasted
    return out


def dense_masks_to_instances(
    mask_maps: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    *,
    mask_threshold: float,
    maps_are_logits: bool,
    rescore_with_mask: bool = False,
    index: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Results of one image from dense mask maps (SparseInst, FastInst).

    Args:
        mask_maps: ``(U, h, w)`` mask logits (``maps_are_logits``) or probabilities at a stride of
            the padded input ``padded_size`` ``(Hp, Wp)``.
        scores, labels: ``(K,)`` float scores and int64 contiguous class ids of the kept instances.
        image_size: ``(h_img, w_img)`` of the image after the test resize (inside the padding).
        output_size: ``(height, width)``, the original image size.
        mask_threshold: foreground when the probability is ``> mask_threshold``.
        maps_are_logits: resize the logits, then apply the sigmoid (Mask2Former / FastInst);
            ``False``: the maps are probabilities and are resized as such (SparseInst).
        rescore_with_mask: multiply the scores by the mean mask probability inside the binary
            mask at the original size (FastInst, Mask2Former's ``instance_inference``).
        index: ``(K,)`` row of ``mask_maps`` for each instance (a query kept with several classes
            is resized once); ``None`` when ``U == K`` in order.

    Returns:
        ``{"scores": (K,), "labels": (K,), "masks": bool (K, height, width), "boxes": (K, 4) xyxy}``
        with the masks' tight boxes in pixels of the original image.
    """
    probs = masks_to_original(mask_maps, padded_size, image_size, output_size)
    if maps_are_logits:
        probs = probs.sigmoid_()
    binary = binarize(probs, mask_threshold)
    if rescore_with_mask:
        # mean probability inside the mask, in place (no second full-size float tensor)
        mask_scores = probs.masked_fill_(~binary, 0).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
    if index is not None:
        binary = binary[index]
        if rescore_with_mask:
            mask_scores = mask_scores[index]
    if rescore_with_mask:
        scores = scores * mask_scores
    return {"scores": scores, "labels": labels, "masks": binary, "boxes": boxes_from_masks(binary)}


def roi_masks_to_instances(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    *,
    mask_threshold: float,
) -> Dict[str, torch.Tensor]:
    """Results of one image from box-relative masks (QueryInst, FASSST).

    Args:
        mask_probs: ``(K, M, M)`` mask probabilities, each relative to its box.
        scores, labels: ``(K,)``.
        boxes: ``(K, 4)`` xyxy in pixels of the network input (after the test resize), the boxes
            the masks were predicted for (the RoIs).
        image_size: ``(h_img, w_img)`` of the network input image (without padding).
        output_size: ``(height, width)``, the original image size.
        mask_threshold: foreground when the pasted probability is ``> mask_threshold``.

    Returns:
        The data-contract dict; ``boxes`` are scaled to the original size and clipped to it, the
        masks are pasted into the unclipped scaled boxes.
    """
    h_in, w_in = image_size
    out_h, out_w = int(output_size[0]), int(output_size[1])
    scale = boxes.new_tensor([out_w / w_in, out_h / h_in, out_w / w_in, out_h / h_in], dtype=torch.float32)
    scaled = boxes.float() * scale
    masks = paste_masks_in_boxes(mask_probs, scaled, (out_h, out_w), threshold=mask_threshold)
    clipped = scaled.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, out_w)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, out_h)
    return {"scores": scores, "labels": labels, "masks": masks, "boxes": clipped}
