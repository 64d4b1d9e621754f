"""Paste box-relative mask probabilities into the image (Detectron2's / mmdetection's
``paste_masks_in_image`` idea, written with ``grid_sample``).

A ``M x M`` mask belongs to a box ``(x1, y1, x2, y2)``: image pixel ``(x, y)`` (centre
``x + 0.5``) reads the mask at normalized position ``2 (x + 0.5 - x1) / (x2 - x1) - 1`` (and the
same for y) with bilinear interpolation (``align_corners=False``); pixels outside the box read 0.
Only the box's pixel range (plus one pixel) is sampled, so the cost is proportional to the box
areas, not to K x H x W.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["paste_masks_in_image"]


def paste_masks_in_image(
    masks: torch.Tensor, boxes: torch.Tensor, image_shape: Tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Paste ``(K, M, M)`` mask probabilities at ``(K, 4)`` xyxy boxes into ``(K, H, W)``.

    Args:
        masks: ``(K, M, M)`` float probabilities in [0, 1] (any square or rectangular ``M``).
        boxes: ``(K, 4)`` xyxy in pixels of the output image.
        image_shape: ``(H, W)`` of the output.
        threshold: probability at or above which a pixel is foreground; ``< 0`` returns the pasted
            float probabilities instead of a bool mask.
    Returns:
        ``(K, H, W)`` bool (or float32 when ``threshold < 0``).
    Raises:
        ValueError: ``masks`` is not 3-D or ``boxes`` is not ``(K, 4)``.
    """
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"masks (K, M, M) and boxes (K, 4) expected, got {tuple(masks.shape)}, {tuple(boxes.shape)}")
    h, w = int(image_shape[0]), int(image_shape[1])
    out = torch.zeros((masks.shape[0], h, w), dtype=torch.float32, device=masks.device)
    boxes_cpu = boxes.detach().float().cpu().tolist()
    for k, (x1, y1, x2, y2) in enumerate(boxes_cpu):
        if not (x2 > x1 and y2 > y1) or not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        xa, xb = max(int(math.floor(x1)) - 1, 0), min(int(math.ceil(x2)) + 1, w)
        ya, yb = max(int(math.floor(y1)) - 1, 0), min(int(math.ceil(y2)) + 1, h)
        if xb <= xa or yb <= ya:
            continue
        gx = (torch.arange(xa, xb, device=masks.device, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
        gy = (torch.arange(ya, yb, device=masks.device, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, yb-ya, xb-xa, 2)
        patch = F.grid_sample(masks[k][None, None].float(), grid, mode="bilinear", align_corners=False)
        out[k, ya:yb, xa:xb] = patch[0, 0]
    if threshold < 0:
        return out
    return out >= threshold
