"""Mask "tail" of FASSST (Sec. 3.4, Fig. 6) and pasting ROI masks back into the image.

"We use 5 convolutional layers and 1 deconvolution layer to learn the mask representation."
Reading (``MODEL.FASSST.TAIL.LAYOUT``; docs/fassst.md):

* ``"mask_rcnn"`` (default): 4 x (3x3 conv + ReLU), 2x2 stride-2 deconvolution + ReLU, 1x1 conv
  predictor: 5 convs and 1 deconv, in Mask R-CNN's order (the paper compares with Mask R-CNN).
* ``"deconv_last"``: 5 x (3x3 conv + ReLU), then the deconvolution straight to the mask logits.

Masks are class-agnostic (one channel): the class comes from the slot.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.norm import get_norm

__all__ = ["MaskTail", "TAIL_LAYOUTS", "paste_masks_in_boxes"]

TAIL_LAYOUTS = ("mask_rcnn", "deconv_last")


class MaskTail(nn.Module):
    """Fused ROI features -> instance mask logits at twice the ROI size.

    Args:
        in_channels: channels ``d`` of ``R``.
        dim: channels of the hidden layers.
        layout: ``"mask_rcnn"`` or ``"deconv_last"`` (module docstring).
        norm: norm after each 3x3 conv (``""`` = none).

    Forward: ``R`` ``(K, d, S, S)`` -> mask logits ``(K, 2S, 2S)``.

    Raises:
        ValueError: unknown layout / norm.
    """

    def __init__(self, in_channels: int = 256, dim: int = 256, layout: str = "mask_rcnn", norm: str = ""):
        super().__init__()
        if layout not in TAIL_LAYOUTS:
            raise ValueError(f"MODEL.FASSST.TAIL.LAYOUT must be one of {TAIL_LAYOUTS}, got '{layout}'")
        self.layout = layout
        num_3x3 = 4 if layout == "mask_rcnn" else 5
        convs: List[nn.Module] = []
        ch = in_channels
        for _ in range(num_3x3):
            convs.append(nn.Conv2d(ch, dim, 3, padding=1, bias=not norm))
            n = get_norm(norm, dim)
            if n is not None:
                convs.append(n)
            convs.append(nn.ReLU(inplace=True))
            ch = dim
        self.convs = nn.Sequential(*convs)
        if layout == "mask_rcnn":
            self.deconv = nn.ConvTranspose2d(dim, dim, 2, stride=2)
            self.predictor = nn.Conv2d(dim, 1, 1)
        else:
            self.deconv = nn.ConvTranspose2d(dim, 1, 2, stride=2)
            self.predictor = None
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        last = self.predictor if self.predictor is not None else self.deconv
        nn.init.normal_(last.weight, std=0.001)  # Mask R-CNN's predictor init

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> "MaskTail":
        t = cfg.MODEL.FASSST.TAIL
        return cls(in_channels=in_channels, dim=t.DIM, layout=t.LAYOUT, norm=t.NORM)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        x = self.deconv(self.convs(rois))
        if self.predictor is not None:
            x = self.predictor(F.relu(x))
        return x[:, 0]


def paste_masks_in_boxes(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Paste ROI mask maps into a ``(H, W)`` image (Detectron2's ``paste_masks_in_image`` idea).

    Each ``(M, M)`` map covers its box ``[x1, x2] x [y1, y2]`` (continuous pixel coordinates, the
    same convention as RoIAlign with ``aligned=True``); every image pixel whose centre lies in the
    box is bilinearly sampled from the map (:func:`torch.nn.functional.grid_sample`,
    ``align_corners=False``), the others are 0. Only the box region is computed.

    Args:
        masks: ``(K, M, M)`` float mask probabilities (or logits).
        boxes: ``(K, 4)`` xyxy in pixels of the output image.
        image_size: ``(H, W)``.

    Returns:
        ``(K, H, W)`` in ``masks``' dtype.

    Raises:
        ValueError: ``masks`` and ``boxes`` disagree in K or have wrong shapes.
    """
    if masks.dim() != 3 or boxes.dim() != 2 or boxes.shape[1] != 4 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"expected masks (K, M, M) and boxes (K, 4), got {tuple(masks.shape)} and {tuple(boxes.shape)}")
    h, w = int(image_size[0]), int(image_size[1])
    out = masks.new_zeros((masks.shape[0], h, w))
    boxes = boxes.float()
    for i in range(masks.shape[0]):
        x1, y1, x2, y2 = boxes[i].tolist()
        if not (x2 > x1 and y2 > y1):
            continue
        c0, c1 = max(int(x1 - 0.5) , 0), min(int(x2 + 0.5) + 1, w)
        r0, r1 = max(int(y1 - 0.5), 0), min(int(y2 + 0.5) + 1, h)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = (torch.arange(c0, c1, device=masks.device, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
        ys = (torch.arange(r0, r1, device=masks.device, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
        inside_x, inside_y = (xs >= -1) & (xs <= 1), (ys >= -1) & (ys <= 1)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]
        sampled = F.grid_sample(masks[i][None, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled[0, 0] * (inside_y[:, None] & inside_x[None, :])
        out[i, r0:r1, c0:c1] = sampled.to(out.dtype)
    return out
