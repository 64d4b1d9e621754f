"""Instance context encoder of SparseInst (Sec. 3.2, Fig. 3; ablation Table 2).

An FPN over C3-C5 whose coarsest lateral output goes through a pyramid pooling module (PPM), and
whose three 3x3 outputs are resized to 1/8 and fused by a 1x1 conv into a single-level feature map.
Structure and init follow the official ``sparseinst/encoder.py`` (docs/sparseinst.md); state-dict keys are
the official ones (``fpn_laterals.<i>``, ``fpn_outputs.<i>``, ``ppm.*``, ``fusion``), index 0 being
the coarsest level.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from fvcore.nn.weight_init import c2_msra_fill, c2_xavier_fill
from torch import nn

from instseg.modeling.encoders import PyramidPoolingModule

__all__ = ["InstanceContextEncoder"]


class InstanceContextEncoder(nn.Module):
    """``{res3, res4, res5}`` -> ``(B, C, H/8, W/8)``.

    Args:
        in_channels: channels of the input levels, finest first (e.g. ``[512, 1024, 2048]``).
        in_features: their names in the backbone's output dict, finest first.
        channels: C (256).
        use_ppm: apply the PPM to the coarsest lateral (Table 2 "w/ PPM").
        use_fusion: fuse all three outputs at 1/8 (Table 2 "w/ fusion"); without it the finest
            FPN output is returned (the vanilla FPN row).
        ppm_channels, ppm_sizes: PPM branch width (64) and bins (1, 2, 3, 6).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        channels: int = 256,
        use_ppm: bool = True,
        use_fusion: bool = True,
        ppm_channels: int = 64,
        ppm_sizes: Sequence[int] = (1, 2, 3, 6),
    ):
        super().__init__()
        if len(in_channels) != len(in_features):
            raise ValueError("in_channels and in_features must have the same length")
        self.in_features = list(in_features)
        self.fpn_laterals = nn.ModuleList()
        self.fpn_outputs = nn.ModuleList()
        for c in reversed(list(in_channels)):
            lat = nn.Conv2d(c, channels, 1)
            out = nn.Conv2d(channels, channels, 3, padding=1)
            c2_xavier_fill(lat)
            c2_xavier_fill(out)
            self.fpn_laterals.append(lat)
            self.fpn_outputs.append(out)
        self.ppm = PyramidPoolingModule(channels, channels, ppm_channels, ppm_sizes) if use_ppm else None
        self.fusion = nn.Conv2d(channels * len(in_channels), channels, 1) if use_fusion else None
        if self.fusion is not None:
            c2_msra_fill(self.fusion)
        self.out_channels = channels

    @classmethod
    def from_config(cls, cfg, input_shape) -> "InstanceContextEncoder":
        e = cfg.MODEL.SPARSE_INST.ENCODER
        return cls(
            in_channels=[input_shape[f].channels for f in e.IN_FEATURES],
            in_features=e.IN_FEATURES,
            channels=e.NUM_CHANNELS,
            use_ppm=e.USE_PPM,
            use_fusion=e.USE_FUSION,
            ppm_channels=e.PPM_CHANNELS,
            ppm_sizes=e.PPM_SIZES,
        )

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        feats: List[torch.Tensor] = [features[f] for f in self.in_features][::-1]  # coarsest first
        prev = self.fpn_laterals[0](feats[0])
        if self.ppm is not None:
            prev = self.ppm(prev)
        outputs = [self.fpn_outputs[0](prev)]
        for feat, lat_conv, out_conv in zip(feats[1:], self.fpn_laterals[1:], self.fpn_outputs[1:]):
            lat = lat_conv(feat)
            prev = lat + F.interpolate(prev, size=lat.shape[-2:], mode="nearest")
            outputs.insert(0, out_conv(prev))
        if self.fusion is None:
            return outputs[0]
        size = outputs[0].shape[-2:]
        fused = [outputs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outputs[1:]]
        return self.fusion(torch.cat(fused, dim=1))
