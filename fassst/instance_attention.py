"""Instance attention module (IAM) of FASSST (Sec. 3.2, Eq. 2, Fig. 4).

The IAM regresses, straight from the raw features ``E`` of the network head, the instance
information tensor ``I`` with one row per slot: ``n`` slots (36 on COCO, 49 on Cityscapes; Table 7
sweeps 16, 25, 36, 49, 64, 81), each holding the top-most ``t``, left-most ``l``, bottom-most
``b`` and right-most ``r`` coordinate of an instance and ``s`` class scores. We store ``I`` as
``(B, n, 4 + s)``; the paper writes "n x c x s" with ``c = 4``.

Reading of the paper (docs/fassst.md; each one a key of ``MODEL.FASSST.IAM``):

* ``n`` is always a square (Table 7: "the squared numbers from 4 to 9"), read as a
  ``sqrt(n) x sqrt(n)`` grid of slots, YOLO-style ([26]): ``POOL_AFTER`` 3x3 convs at E's
  resolution, adaptive average pooling to the grid, 3x3 convs on the grid, and a 1x1 conv to
  ``4 + s`` channels: ``NUM_CONVS`` = 9 conv layers in all (Sec. 4.3.1). Slots are numbered
  row-major over the grid.
* Coordinates are fractions of the padded input height/width, ``sigmoid`` of the slot tensor's
  first 4 channels (so the localization loss can be "based on Focal Loss", Sec. 3.5).
  ``BOX_PARAM = "cell_reference"`` adds ``logit`` of the slot's reference box (the central half of
  its grid cell) to the raw outputs before storing them in ``I`` (Deformable-DETR's
  inverse-sigmoid reference trick), so that a slot starts at its own cell and can move anywhere;
  ``"absolute"`` stores the raw outputs.
* ``s = K`` sigmoid class scores (``CONFIDENCE = False``), or ``K + 1`` with a last confidence
  channel (``CONFIDENCE = True``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from instseg.modeling.layers import conv_norm_relu_stack, coordinate_features

__all__ = [
    "BOX_PARAMS",
    "InstanceAttentionModule",
    "slot_grid_size",
    "slot_reference_boxes",
    "tlbr_to_xyxy",
]

BOX_PARAMS = ("cell_reference", "absolute")


def slot_grid_size(num_slots: int) -> int:
    """Side ``g`` of the ``g x g`` slot grid for ``num_slots = g**2``.

    Raises:
        ValueError: ``num_slots`` is not a positive perfect square.
    """
    g = math.isqrt(int(num_slots)) if num_slots > 0 else 0
    if g < 1 or g * g != int(num_slots):
        raise ValueError(
            f"MODEL.FASSST.NUM_SLOTS must be a perfect square (a g x g slot grid; Table 7 uses 16..81), got {num_slots}"
        )
    return g


def slot_reference_boxes(grid: int, device=None) -> torch.Tensor:
    """Reference boxes of the ``grid x grid`` slots: the central half of each cell.

    Returns:
        ``(grid * grid, 4)`` float32 ``(t, l, b, r)`` as fractions of the input size, row-major
        (slot ``i`` is cell ``(i // grid, i % grid)``).
    """
    idx = torch.arange(grid, dtype=torch.float32, device=device)
    lo, hi = (idx + 0.25) / grid, (idx + 0.75) / grid
    gy, gx = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    gy, gx = gy.flatten(), gx.flatten()
    return torch.stack([lo[gy], lo[gx], hi[gy], hi[gx]], dim=-1)


def tlbr_to_xyxy(tlbr: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Normalized ``(..., 4)`` ``(t, l, b, r)`` -> ``(..., 4)`` xyxy in pixels of a
    ``height x width`` image. Coordinates are sorted (``x1 <= x2``, ``y1 <= y2``) so that a slot
    whose bottom lies above its top still gives a valid box."""
    t, l, b, r = tlbr.unbind(-1)
    x1, x2 = torch.minimum(l, r) * width, torch.maximum(l, r) * width
    y1, y2 = torch.minimum(t, b) * height, torch.maximum(t, b) * height
    return torch.stack([x1, y1, x2, y2], dim=-1)


class InstanceAttentionModule(nn.Module):
    """``I = attn(E)`` (Eq. 2): raw features -> slot tensor ``(B, n, 4 + s)``.

    Args:
        in_channels: channels of ``E``.
        num_classes: K.
        num_slots: n (a perfect square).
        dim: channels of the hidden convs.
        num_convs: conv layers in all, the 1x1 slot predictor included (9, Sec. 4.3.1).
        pool_after: 3x3 convs applied at E's resolution before pooling to the slot grid
            (``0 .. num_convs - 1``).
        norm: norm after each hidden conv (``""``, ``"BN"``, ``"GN"``, ...).
        use_coord: concatenate 2 CoordConv channels (x, y in [-1, 1]) to E.
        confidence: ``s = K + 1`` (last channel = confidence) instead of ``s = K``.
        box_param: ``"cell_reference"`` or ``"absolute"`` (module docstring).
        prior_prob: initial class probability (bias ``-log((1 - p) / p)``, RetinaNet).

    Forward:
        ``E``: ``(B, in_channels, h, w)`` float -> ``(B, n, 4 + s)`` in E's dtype: channels 0-3 are
        the logits of ``(t, l, b, r)`` as fractions of the input height/width (``sigmoid`` gives
        the coordinates), channels ``4 .. 4 + K`` the class logits, and with ``confidence`` the
        last channel the confidence logit.

    Raises:
        ValueError: ``num_slots`` not a square, ``num_convs < 1``, ``pool_after`` out of range,
            unknown ``box_param`` / norm, or E with the wrong number of channels (in forward).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_slots: int = 36,
        dim: int = 256,
        num_convs: int = 9,
        pool_after: int = 4,
        norm: str = "BN",
        use_coord: bool = False,
        confidence: bool = False,
        box_param: str = "cell_reference",
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_convs < 1:
            raise ValueError(f"MODEL.FASSST.IAM.NUM_CONVS must be >= 1, got {num_convs}")
        if not 0 <= pool_after <= num_convs - 1:
            raise ValueError(f"MODEL.FASSST.IAM.POOL_AFTER must be in 0..{num_convs - 1}, got {pool_after}")
        if box_param not in BOX_PARAMS:
            raise ValueError(f"MODEL.FASSST.IAM.BOX_PARAM must be one of {BOX_PARAMS}, got '{box_param}'")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.num_slots = int(num_slots)
        self.grid = slot_grid_size(num_slots)
        self.use_coord = bool(use_coord)
        self.confidence = bool(confidence)
        self.box_param = box_param
        self.slot_channels = 4 + self.num_classes + int(self.confidence)

        ch = self.in_channels + (2 if self.use_coord else 0)
        pre, post = [], []
        for i in range(num_convs - 1):
            (pre if i < pool_after else post).append(conv_norm_relu_stack(1, ch, dim, 3, norm))  # keys <j>.0, <j>.1
            ch = dim
        self.pre_pool = nn.Sequential(*pre)
        self.post_pool = nn.Sequential(*post)
        self.predictor = nn.Conv2d(ch, self.slot_channels, 1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)
        with torch.no_grad():
            self.predictor.bias[4:].fill_(-math.log((1 - prior_prob) / prior_prob))
        ref = torch.logit(slot_reference_boxes(self.grid)) if box_param == "cell_reference" else torch.zeros(self.num_slots, 4)
        self.register_buffer("reference_logits", ref, persistent=False)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> "InstanceAttentionModule":
        f = cfg.MODEL.FASSST
        return cls(
            in_channels=in_channels,
            num_classes=cfg.MODEL.NUM_CLASSES,
            num_slots=f.NUM_SLOTS,
            dim=f.IAM.DIM,
            num_convs=f.IAM.NUM_CONVS,
            pool_after=f.IAM.POOL_AFTER,
            norm=f.IAM.NORM,
            use_coord=f.IAM.USE_COORD,
            confidence=f.IAM.CONFIDENCE,
            box_param=f.IAM.BOX_PARAM,
            prior_prob=f.IAM.PRIOR_PROB,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"IAM expects E of shape (B, {self.in_channels}, h, w), got {tuple(features.shape)}")
        x = features
        if self.use_coord:
            x = torch.cat([x, coordinate_features(x)], dim=1)
        x = self.pre_pool(x)
        x = F.adaptive_avg_pool2d(x, (self.grid, self.grid))
        x = self.predictor(self.post_pool(x))  # (B, 4 + s, g, g)
        slots = x.flatten(2).transpose(1, 2)  # (B, n, 4 + s), row-major slots
        box = slots[..., :4] + self.reference_logits.to(slots.dtype)
        return torch.cat([box, slots[..., 4:]], dim=-1)

    def split(self, slots: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """Split ``(B, n, 4 + s)`` into ``box_logits`` ``(B, n, 4)`` (t, l, b, r logits),
        ``class_logits`` ``(B, n, K)`` and ``confidence_logits`` ``(B, n)`` (None without it)."""
        if slots.shape[-1] != self.slot_channels:
            raise ValueError(f"slot tensor has {slots.shape[-1]} channels, expected {self.slot_channels}")
        return {
            "box_logits": slots[..., :4],
            "class_logits": slots[..., 4 : 4 + self.num_classes],
            "confidence_logits": slots[..., -1] if self.confidence else None,
        }
