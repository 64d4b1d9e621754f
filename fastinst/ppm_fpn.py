"""PPM-FPN pixel decoder (FastInst main paper, "lightweight pixel decoder"; official ``PyramidPoolingModuleFPN``, docs/fastinst.md).

An FPN over C3-C5 whose coarsest lateral output goes through a pyramid pooling module (bins 1, 2,
3, 6): per level a lateral 1x1 conv and an output 3x3 conv, both with GroupNorm (32 groups, no
bias) at 256 channels, ReLU after the output conv, bilinear top-down upsampling. It returns
E5, E4, E3 (strides 32, 16, 8; the paper's notation, coarsest first as the official code orders
them). E3 is the 1/8 pixel (mask) feature map, E4 feeds FastInst's IA-guided query selection.

State-dict keys are the official ones: ``adapter_<i>`` (lateral) and ``layer_<i>`` (output) with
``i = 1`` the finest level (C3), their norms under ``.norm``, and ``ppm.stages.<j>.1`` /
``ppm.bottleneck``.

SparseInst's instance context encoder is the same FPN + PPM idea but without norms, with nearest
upsampling and a final fusion of the three levels; it keeps its own module (official key names
differ), while :class:`PPMFPN` covers the norm-free and nearest variants through its arguments.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from fvcore.nn.weight_init import c2_xavier_fill
from torch import nn

from instseg.modeling.encoders import PyramidPoolingModule

__all__ = ["ConvNorm", "PPMFPN"]


class ConvNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` submodule and activation (Detectron2's
    ``Conv2d`` layout: keys ``weight``, ``bias``, ``norm.weight``, ``norm.bias``)."""

    def __init__(self, *args, norm: nn.Module | None = None, activation: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.activation else x


def _norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "":
        return None
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"PPM-FPN norm must be 'GN', 'BN' or '' (none), got '{norm}'")


class PPMFPN(nn.Module):
    """``{res3, res4, res5}`` -> ``[E5, E4, E3]``, each ``(B, C, H/s, W/s)`` for s = 32, 16, 8.

    Args:
        in_channels: channels of the input levels, finest first (``[512, 1024, 2048]`` for ResNet-50).
        in_features: their names in the backbone's output dict, finest first.
        channels: C (256, ``MODEL.FASTINST.PIXEL_DECODER.CONVS_DIM``).
        norm: "GN" (official FastInst), "BN" or "" (no norm; convs then have biases).
        use_ppm: apply the pyramid pooling module to the coarsest lateral output.
        ppm_channels: width of each PPM branch (``channels // 4`` = 64 officially).
        ppm_sizes: PPM bins (1, 2, 3, 6).
        upsample_mode: top-down interpolation, "bilinear" (FastInst) or "nearest".
        output_activation: ReLU after each output conv (FastInst: yes).

    Raises:
        ValueError: ``in_channels`` and ``in_features`` differ in length, or an unknown norm/mode.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        channels: int = 256,
        norm: str = "GN",
        use_ppm: bool = True,
        ppm_channels: int = 64,
        ppm_sizes: Sequence[int] = (1, 2, 3, 6),
        upsample_mode: str = "bilinear",
        output_activation: bool = True,
    ):
        super().__init__()
        if len(in_channels) != len(in_features):
            raise ValueError(f"in_channels {list(in_channels)} and in_features {list(in_features)} differ in length")
        if upsample_mode not in ("bilinear", "nearest"):
            raise ValueError(f"upsample_mode must be 'bilinear' or 'nearest', got '{upsample_mode}'")
        self.in_features = list(in_features)
        self.upsample_mode = upsample_mode
        use_bias = norm == ""
        for idx, c in enumerate(in_channels):
            lateral = ConvNorm(c, channels, kernel_size=1, bias=use_bias, norm=_norm(norm, channels))
            output = ConvNorm(
                channels, channels, kernel_size=3, padding=1, bias=use_bias, norm=_norm(norm, channels),
                activation=output_activation,
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
        self.ppm = PyramidPoolingModule(channels, channels, ppm_channels, ppm_sizes) if use_ppm else None
        self.out_channels = channels
        self.num_levels = len(in_channels)

    @classmethod
    def from_config(cls, cfg_node, input_shape) -> "PPMFPN":
        """From a config node with ``IN_FEATURES``, ``CONVS_DIM``, ``NORM``, ``USE_PPM``,
        ``PPM_CHANNELS``, ``PPM_SIZES`` and the backbone's ``output_shape()``."""
        missing = [f for f in cfg_node.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"pixel decoder IN_FEATURES {missing} not produced by the backbone ({sorted(input_shape)})")
        return cls(
            in_channels=[input_shape[f].channels for f in cfg_node.IN_FEATURES],
            in_features=cfg_node.IN_FEATURES,
            channels=cfg_node.CONVS_DIM,
            norm=cfg_node.NORM,
            use_ppm=cfg_node.USE_PPM,
            ppm_channels=cfg_node.PPM_CHANNELS,
            ppm_sizes=cfg_node.PPM_SIZES,
        )

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """``features[name]``: ``(B, C_i, H_i, W_i)`` -> list of ``(B, C, H_i, W_i)``, coarsest first."""
        outputs: List[torch.Tensor] = []
        y = None
        for idx in range(self.num_levels - 1, -1, -1):
            x = features[self.in_features[idx]]
            lateral = getattr(self, f"adapter_{idx + 1}")(x)
            if y is None:
                y = self.ppm(lateral) if self.ppm is not None else lateral
            else:
                kw = {"align_corners": False} if self.upsample_mode == "bilinear" else {}
                y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode=self.upsample_mode, **kw)
            y = getattr(self, f"layer_{idx + 1}")(y)
            outputs.append(y)
        return outputs
