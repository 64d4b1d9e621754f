"""Pieces of the data contract every meta-architecture shares (docs/architecture.md, "Data contract").

Inputs are lists of dicts with ``"image"``: ``uint8 (3, H, W)`` RGB; the model normalizes and pads
them itself, and returns results at ``("height", "width")``, the original size.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes

__all__ = ["MetaArchBase", "pad_to_divisible", "masks_to_original", "boxes_from_masks"]


def pad_to_divisible(
    tensors: Sequence[torch.Tensor], size_divisibility: int = 32, pad_value: float = 0.0
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Stack ``(C, H_i, W_i)`` tensors into ``(B, C, H, W)``, zero-padded at the bottom/right.

    ``H`` and ``W`` are the largest ``H_i``/``W_i`` rounded up to a multiple of
    ``size_divisibility`` (no rounding for values <= 1). Returns the batch and the unpadded
    ``(H_i, W_i)`` of each image.
    """
    if len(tensors) == 0:
        raise ValueError("pad_to_divisible: empty list of images")
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    max_h = max(s[0] for s in sizes)
    max_w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        d = size_divisibility
        max_h = (max_h + d - 1) // d * d
        max_w = (max_w + d - 1) // d * d
    out = tensors[0].new_full((len(tensors), tensors[0].shape[0], max_h, max_w), pad_value)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[-2], : t.shape[-1]].copy_(t)
    return out, sizes


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

    Uses :func:`torchvision.ops.masks_to_boxes`, whose ``x2``/``y2`` are the last foreground
    pixel's index; we add 1 so that the box covers the pixel (COCO convention).
    """
    boxes = masks.new_zeros((masks.shape[0], 4), dtype=torch.float32)
    if masks.numel() == 0:
        return boxes
    nonempty = masks.flatten(1).any(1)
    if nonempty.any():
        b = masks_to_boxes(masks[nonempty]).float()
        b[:, 2:] += 1
        boxes[nonempty] = b
    return boxes


class MetaArchBase(nn.Module):
    """Base class: pixel normalization and padding from the config, and the device property.

    Subclasses implement ``forward(batched_inputs)`` following the data contract (docs/architecture.md).
    """

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int):
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("PIXEL_MEAN and PIXEL_STD need 3 values (RGB)")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size_divisibility = int(size_divisibility)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_images(self, batched_inputs: List[Dict]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalize ``uint8 (3, H, W)`` RGB images and pad them into ``(B, 3, Hp, Wp)`` float32."""
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected image of shape (3, H, W), got {tuple(img.shape)}")
            img = img.to(self.device, non_blocking=True).float()
            images.append((img - self.pixel_mean) / self.pixel_std)
        return pad_to_divisible(images, self.size_divisibility)
