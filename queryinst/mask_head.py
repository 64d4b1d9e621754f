"""The dynamic mask head of one QueryInst stage.

Paper Eq. (3):

    x_t^mask   <- P^mask(x^FPN, b_t)                 RoIAlign 14x14 on the stage's refined boxes
    x_t^mask*  <- DynConv_t^mask(x_t^mask, q*_{t-1})  the query after the (shared) MSA
    m_t        <- M_t(x_t^mask*)                     4 x (3x3 conv + norm + ReLU), deconv x2, 1x1

Official details (docs/queryinst.md; hustvl/QueryInst ``dynamic_mask_head.py``): ``DynConv`` without
projection, its ``196 x 256`` output reshaped to ``256 x 14 x 14``; convs 3x3 256 with BN (no bias)
and ReLU; ``ConvTranspose2d(256, 256, 2, stride 2)`` + ReLU to 28x28; 1x1 conv to K class-specific
mask logits. Init: the convs as mmcv's ``ConvModule`` (Kaiming-normal fan_out), everything else
PyTorch's default (see :meth:`DynamicMaskHead.reset_parameters`).

Ablation switches (poster Table 4):
- ``use_dynamic_conv=False`` is the "vanilla mask head" of Fig. 2(b) (Sparse R-CNN + a Cascade
  Mask R-CNN head): the RoI feature goes to the convs directly and the query is not used.
- ``mask_flow=True`` adds HTC's mask information flow: the previous stage's mask feature (the
  output of its 4 convs, 14x14) passes a 1x1 conv and is added to this stage's conv input
  (the poster's "M_i features -> 1x1 conv feature embedding -> M_{i+1}").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from instseg.modeling.layers import conv_norm_relu_stack

from .dynamic_conv import DynConv

__all__ = ["DynamicMaskHead"]


class DynamicMaskHead(nn.Module):
    """Mask head of one stage (see the module docstring).

    Args:
        num_classes: K, the number of class-specific mask channels.
        dim: C, channels of the RoI features and queries (256).
        dynamic_dim: D of ``DynConv^mask`` (64).
        pooler_resolution: S of the mask RoI feature (14); masks are ``2S x 2S`` (28).
        num_convs: 3x3 convs (4).
        conv_dim: their channels (256).
        norm: norm after each conv: ``"BN"`` (official), ``"SyncBN"``, ``"GN"`` or ``""``.
        use_dynamic_conv: Table 4 ``DynConv^mask`` column.
        mask_flow: this head receives the previous stage's mask feature (Table 4 "HTC Mask Flow";
            only for stages after the first).

    Forward:
        roi_feats: ``(R, C, S, S)``.
        queries: ``(R, C)`` ``q*`` of the same RoIs (ignored without dynamic conv; may be None then).
        prev_feats: ``(R, conv_dim, S, S)`` mask feature of the previous stage (mask flow) or None.
        returns ``(mask_logits (R, K, 2S, 2S), mask_feats (R, conv_dim, S, S))``.

    Raises:
        ValueError: ``queries`` missing with dynamic conv, or ``prev_feats`` missing with mask flow.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        dynamic_dim: int = 64,
        pooler_resolution: int = 14,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str = "BN",
        use_dynamic_conv: bool = True,
        mask_flow: bool = False,
    ):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.use_dynamic_conv, self.mask_flow = use_dynamic_conv, mask_flow
        self.dynconv = DynConv(dim, dynamic_dim, dim, pooler_resolution, with_proj=False) if use_dynamic_conv else None
        self.flow_conv = nn.Conv2d(conv_dim, dim, 1) if mask_flow else None
        self.convs = conv_norm_relu_stack(num_convs, dim, conv_dim, 3, norm)
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else dim, conv_dim, 2, stride=2)
        self.deconv_relu = nn.ReLU(inplace=True)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The init both official versions end up with (docs/queryinst.md, "Initialization"):
        each 3x3 conv as mmcv's ``ConvModule`` initializes itself when built (Kaiming-normal,
        ``fan_out``, ReLU gain; bias 0 when there is one; its norm 1 / 0); ``DynConv^mask``, the
        deconv and the logits conv keep PyTorch's default init.

        ``DynamicMaskHead.init_weights`` (Xavier on every matrix, zero logits bias) is never run
        officially: the mask heads sit in a plain ``nn.ModuleList`` (``CascadeRoIHead.init_mask_head``
        in mmdetection 2.x, which hustvl/QueryInst is built on, and in 3.x) and mmcv's / mmengine's
        ``BaseModule.init_weights`` only recurses into children that have an ``init_weights``.
        """
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        roi_feats: torch.Tensor,
        queries: Optional[torch.Tensor] = None,
        prev_feats: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        x = roi_feats
        if self.dynconv is not None:
            if queries is None:
                raise ValueError("DynamicMaskHead with DynConv^mask needs the queries")
            r, c, h, w = roi_feats.shape
            # (R, S*S, C) -> (R, C, S, S)
            x = self.dynconv(queries, roi_feats).transpose(1, 2).reshape(r, -1, h, w)
        if self.flow_conv is not None:
            if prev_feats is None:
                raise ValueError("DynamicMaskHead with mask flow needs the previous stage's mask features")
            x = x + self.flow_conv(prev_feats)
        feats = self.convs(x)
        logits = self.predictor(self.deconv_relu(self.deconv(feats)))
        return logits, feats
