"""DynConv: the instance-interactive dynamic convolution of Sparse R-CNN, used by QueryInst as
``DynConv^box`` (box head) and ``DynConv^mask`` (mask head).

Poster / paper Eq. (1)-(2): ``x*, q <- DynConv(x, q*)``. The query ``q*`` (one ``C``-vector per
proposal) generates the parameters of two 1x1 convolutions that are applied to the proposal's own
RoI feature ``x`` (``S x S`` positions, ``C`` channels):

    [W1 | W2] = Linear(q*)                  W1: (C, D), W2: (D, C_out)      (D = 64)
    h = ReLU(LN(x W1))                      (S*S, D)
    y = ReLU(LN(h W2))                      (S*S, C_out)
    box:  out = ReLU(LN(Linear(flatten(y))))   (C_out,)        ``with_proj=True``
    mask: out = y                              (S*S, C_out)    ``with_proj=False``

Dimensions, LayerNorms and the projection follow the official code (docs/queryinst.md: DynamicConv
256 -> 64 -> 256 with LayerNorm + ReLU, a projection of the flattened 256 x 49 to 256 in the box
head, no projection in the mask head).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DynConv"]


class DynConv(nn.Module):
    """Instance-interactive dynamic convolution (see the module docstring).

    Args:
        in_channels: ``C``, channels of the query and of the RoI feature (256).
        dynamic_dim: ``D``, channels between the two dynamic 1x1 convs (64).
        out_channels: ``C_out`` (256; ``None`` = ``in_channels``).
        input_size: ``S``, side of the RoI feature (7 for boxes, 14 for masks).
        with_proj: flatten the ``S*S x C_out`` output and project it to ``C_out`` (box head).

    Forward:
        query: ``(R, C)`` float, one row per RoI (``R`` = batch x proposals).
        roi_feats: ``(R, C, S, S)`` float.
        returns ``(R, C_out)`` with ``with_proj``, else ``(R, S*S, C_out)`` (row-major positions).

    Raises:
        ValueError: inputs whose shapes do not match ``(R, C)`` / ``(R, C, S, S)``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        dynamic_dim: int = 64,
        out_channels: int | None = None,
        input_size: int = 7,
        with_proj: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.dynamic_dim, self.out_channels = in_channels, dynamic_dim, out_channels
        self.input_size, self.with_proj = input_size, with_proj
        self.num_params_in = in_channels * dynamic_dim
        self.num_params_out = dynamic_dim * out_channels
        # the query -> parameters generator
        self.dynamic_layer = nn.Linear(in_channels, self.num_params_in + self.num_params_out)
        self.norm_in = nn.LayerNorm(dynamic_dim)
        self.norm_out = nn.LayerNorm(out_channels)
        self.activation = nn.ReLU(inplace=True)
        if with_proj:
            self.proj = nn.Linear(out_channels * input_size * input_size, out_channels)
            self.proj_norm = nn.LayerNorm(out_channels)

    def forward(self, query: torch.Tensor, roi_feats: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if query.dim() != 2 or query.shape[1] != self.in_channels:
            raise ValueError(f"DynConv: query must be (R, {self.in_channels}), got {tuple(query.shape)}")
        if roi_feats.shape[1:] != (self.in_channels, s, s) or roi_feats.shape[0] != query.shape[0]:
            raise ValueError(
                f"DynConv: roi_feats must be ({query.shape[0]}, {self.in_channels}, {s}, {s}), "
                f"got {tuple(roi_feats.shape)}"
            )
        params = self.dynamic_layer(query)
        w_in = params[:, : self.num_params_in].view(-1, self.in_channels, self.dynamic_dim)
        w_out = params[:, self.num_params_in :].view(-1, self.dynamic_dim, self.out_channels)
        x = roi_feats.flatten(2).transpose(1, 2)  # (R, S*S, C)
        x = self.activation(self.norm_in(torch.bmm(x, w_in)))
        x = self.activation(self.norm_out(torch.bmm(x, w_out)))
        if not self.with_proj:
            return x
        return self.activation(self.proj_norm(self.proj(x.flatten(1))))
