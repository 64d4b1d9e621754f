"""Mask "tail" of FASSST (Sec. 3.4, Fig. 6); its masks are pasted into the image by the shared
:func:`instseg.modeling.roi_masks_to_instances`.

"We use 5 convolutional layers and 1 deconvolution layer to learn the mask representation."
Reading (``MODEL.FASSST.TAIL.LAYOUT``; docs/fassst.md):

* ``"mask_rcnn"`` (default): 4 x (3x3 conv + ReLU), 2x2 stride-2 deconvolution + ReLU, 1x1 conv
  predictor: 5 convs and 1 deconv, in Mask R-CNN's order (the paper compares with Mask R-CNN).
* ``"deconv_last"``: 5 x (3x3 conv + ReLU), then the deconvolution straight to the mask logits.

Masks are class-agnostic (one channel): the class comes from the slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.layers import conv_norm_relu_stack

__all__ = ["MaskTail", "TAIL_LAYOUTS"]

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
        self.convs = conv_norm_relu_stack(num_3x3, in_channels, dim, 3, norm)
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

