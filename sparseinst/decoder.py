"""IAM-based decoder of SparseInst (Sec. 3.3-3.4, Fig. 3; ablations Tables 3, 4, 7).

Two branches over the encoder output concatenated with two coordinate channels:

* the **instance branch**: a stack of 3x3 convs, then ``F_iam`` predicts N instance activation
  maps (IAM); features are aggregated by the normalized maps (``z = A_bar X^T``) and three linear
  heads give class logits, mask kernels and the IoU-aware objectness;
* the **mask branch**: a stack of 3x3 convs and a 1x1 projection to ``KERNEL_DIM`` mask features.

Masks are ``kernels . mask features`` at 1/8, bilinearly upsampled by ``scale_factor`` (2 -> 1/4).
Module names follow the official ``sparseinst/decoder.py`` so official checkpoints load 1:1.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn.weight_init import c2_msra_fill, c2_xavier_fill
from torch import nn

from instseg.modeling.layers import DeformConv, conv_norm_relu_stack, coordinate_features

__all__ = ["IAMDecoder", "InstanceBranch", "MaskBranch", "IAM_TYPES"]

IAM_TYPES = ("conv3x3", "conv1x1", "two_conv3x3", "group", "cross_attention")


def _conv_stack(num_convs: int, in_channels: int, dim: int, deform_last: bool) -> nn.Sequential:
    """``num_convs`` x (3x3 conv with bias, ReLU), the last conv a modulated :class:`DeformConv`
    with ``deform_last`` (official keys ``<2i>.weight``); plain convs MSRA-filled."""

    def conv(i: int, cin: int, cout: int) -> nn.Module:
        if deform_last and i == num_convs - 1:
            return DeformConv(cin, cout, 3, padding=1, modulated=True, bias=True)
        return nn.Conv2d(cin, cout, 3, padding=1)

    stack = conv_norm_relu_stack(num_convs, in_channels, dim, norm="", conv_layer=conv)
    for m in stack:
        if isinstance(m, nn.Conv2d):
            c2_msra_fill(m)
    return stack


class InstanceBranch(nn.Module):
    """Instance branch: ``(B, C_in, h, w)`` -> logits ``(B, N, K)``, kernels ``(B, N, D_k)``,
    objectness ``(B, N, 1)`` (or None) and IAM logits ``(B, N*G, h, w)`` (attention weights for
    ``cross_attention``).

    ``iam_type`` (Table 4 / Table 7): ``conv3x3`` (vanilla IAM), ``conv1x1``, ``two_conv3x3``
    (3x3, ReLU, 3x3), ``group`` (Group-IAM: a ``groups``-group 3x3 conv to ``N*groups`` maps; the
    ``groups`` features of an instance are concatenated and mixed by ``fc`` + ReLU),
    ``cross_attention`` (``num_masks`` learnable queries, ``num_heads``-head cross attention).
    ``activation``: ``sigmoid`` (maps normalized by their sum, clamped at 1e-6) or ``softmax``
    over pixels (with the official learnable ``softmax_bias``).
    Init (official): IAM and class biases at prior 0.01, IAM/class/kernel weights std 0.01.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_masks: int = 100,
        dim: int = 256,
        num_convs: int = 4,
        kernel_dim: int = 128,
        iam_type: str = "conv3x3",
        activation: str = "sigmoid",
        groups: int = 4,
        num_heads: int = 4,
        use_objectness: bool = True,
        deform_last: bool = False,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if iam_type not in IAM_TYPES:
            raise ValueError(f"unknown IAM type '{iam_type}', expected one of {IAM_TYPES}")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"IAM activation must be 'sigmoid' or 'softmax', got '{activation}'")
        self.iam_type, self.activation = iam_type, activation
        self.num_masks = num_masks
        self.groups = groups if iam_type == "group" else 1
        self.inst_convs = _conv_stack(num_convs, in_channels, dim, deform_last)
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        if iam_type == "cross_attention":
            self.query_embed = nn.Embedding(num_masks, dim)
            self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
            self.iam_conv = None
        else:
            if iam_type == "conv3x3":
                self.iam_conv = nn.Conv2d(dim, num_masks, 3, padding=1)
            elif iam_type == "conv1x1":
                self.iam_conv = nn.Conv2d(dim, num_masks, 1)
            elif iam_type == "group":
                self.iam_conv = nn.Conv2d(dim, num_masks * groups, 3, padding=1, groups=groups)
            else:  # two_conv3x3
                self.iam_conv = nn.Sequential(
                    nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dim, num_masks, 3, padding=1)
                )
                c2_msra_fill(self.iam_conv[0])
            last = self.iam_conv[-1] if isinstance(self.iam_conv, nn.Sequential) else self.iam_conv
            nn.init.normal_(last.weight, std=0.01)
            nn.init.constant_(last.bias, bias_value)
        if activation == "softmax":
            self.softmax_bias = nn.Parameter(torch.ones(1))
        out_dim = dim * self.groups
        self.fc = nn.Linear(out_dim, out_dim) if iam_type == "group" else None
        if self.fc is not None:
            c2_xavier_fill(self.fc)
        self.cls_score = nn.Linear(out_dim, num_classes)
        self.mask_kernel = nn.Linear(out_dim, kernel_dim)
        self.objectness = nn.Linear(out_dim, 1) if use_objectness else None
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, bias_value)
        nn.init.normal_(self.mask_kernel.weight, std=0.01)
        nn.init.constant_(self.mask_kernel.bias, 0.0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x = self.inst_convs(x)
        b, c, h, w = x.shape
        flat = x.flatten(2)  # (B, C, HW)
        if self.iam_type == "cross_attention":
            q = self.query_embed.weight[None].expand(b, -1, -1)
            inst, attn = self.cross_attn(q, flat.transpose(1, 2), flat.transpose(1, 2), need_weights=True)
            iam = attn.view(b, self.num_masks, h, w)
        else:
            iam = self.iam_conv(x)  # (B, N*G, h, w)
            n = iam.shape[1]
            if self.activation == "sigmoid":
                prob = iam.flatten(2).sigmoid()
                inst = torch.bmm(prob, flat.transpose(1, 2))
                inst = inst / prob.sum(-1).clamp(min=1e-6)[:, :, None]
            else:
                prob = F.softmax(iam.flatten(2) + self.softmax_bias, dim=-1)
                inst = torch.bmm(prob, flat.transpose(1, 2))
            if self.fc is not None:
                g = self.groups
                inst = inst.reshape(b, g, n // g, c).transpose(1, 2).reshape(b, n // g, g * c)
                inst = F.relu(self.fc(inst))
        logits = self.cls_score(inst)
        kernels = self.mask_kernel(inst)
        scores = self.objectness(inst) if self.objectness is not None else None
        return logits, kernels, scores, iam


class MaskBranch(nn.Module):
    """Mask branch: ``(B, C_in, h, w)`` -> mask features ``(B, kernel_dim, h, w)``."""

    def __init__(self, in_channels: int, dim: int = 256, num_convs: int = 4, kernel_dim: int = 128, deform_last: bool = False):
        super().__init__()
        self.mask_convs = _conv_stack(num_convs, in_channels, dim, deform_last)
        self.projection = nn.Conv2d(dim, kernel_dim, 1)
        c2_msra_fill(self.projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.mask_convs(x))


class IAMDecoder(nn.Module):
    """Encoder features ``(B, C, H/8, W/8)`` -> dict with

    * ``pred_logits`` ``(B, N, K)`` class logits,
    * ``pred_masks`` ``(B, N, H/4, W/4)`` mask logits (1/8 upsampled by ``scale_factor``),
    * ``pred_scores`` ``(B, N, 1)`` objectness logits (absent without objectness),
    * ``pred_iam`` ``(B, N*G, H/8, W/8)`` when ``output_iam``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_masks: int = 100,
        kernel_dim: int = 128,
        scale_factor: float = 2.0,
        use_coord: bool = True,
        inst_dim: int = 256,
        inst_convs: int = 4,
        mask_dim: int = 256,
        mask_convs: int = 4,
        iam_type: str = "conv3x3",
        activation: str = "sigmoid",
        groups: int = 4,
        num_heads: int = 4,
        use_objectness: bool = True,
        deform_last: bool = False,
        output_iam: bool = False,
    ):
        super().__init__()
        self.use_coord = use_coord
        self.scale_factor = scale_factor
        self.output_iam = output_iam
        c = in_channels + (2 if use_coord else 0)
        self.inst_branch = InstanceBranch(
            c, num_classes, num_masks, inst_dim, inst_convs, kernel_dim, iam_type, activation, groups, num_heads,
            use_objectness, deform_last,
        )
        self.mask_branch = MaskBranch(c, mask_dim, mask_convs, kernel_dim, deform_last)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> "IAMDecoder":
        d = cfg.MODEL.SPARSE_INST.DECODER
        return cls(
            in_channels=in_channels,
            num_classes=cfg.MODEL.NUM_CLASSES,
            num_masks=d.NUM_MASKS,
            kernel_dim=d.KERNEL_DIM,
            scale_factor=d.SCALE_FACTOR,
            use_coord=d.USE_COORD,
            inst_dim=d.INST.DIM,
            inst_convs=d.INST.CONVS,
            mask_dim=d.MASK.DIM,
            mask_convs=d.MASK.CONVS,
            iam_type=d.IAM.TYPE,
            activation=d.IAM.ACTIVATION,
            groups=d.GROUPS,
            num_heads=d.CROSS_ATTN_HEADS,
            use_objectness=cfg.MODEL.SPARSE_INST.LOSS.OBJECTNESS_LOSS != "none",
            deform_last=d.DEFORM_LAST_CONV,
            output_iam=d.OUTPUT_IAM,
        )

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.use_coord:
            features = torch.cat([coordinate_features(features), features], dim=1)
        logits, kernels, scores, iam = self.inst_branch(features)
        mask_feats = self.mask_branch(features)
        b, c, h, w = mask_feats.shape
        masks = torch.bmm(kernels, mask_feats.flatten(2)).view(b, -1, h, w)
        if self.scale_factor != 1:
            masks = F.interpolate(masks, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = {"pred_logits": logits, "pred_masks": masks}
        if scores is not None:
            out["pred_scores"] = scores
        if self.output_iam:
            out["pred_iam"] = iam
        return out
