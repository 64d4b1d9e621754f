"""ResNet backbones: torchvision ResNet (``build_resnet_backbone``) and timm ResNet-D
(``build_resnet_vd_backbone``), with FrozenBN / BN / SyncBN / GN and optional deformable 3x3 convs.

The library model is kept whole as ``self.body`` (its classifier removed), so the state-dict keys
are torchvision's / timm's own (``body.conv1.weight``, ``body.layer1.0.conv1.weight``, ...) and an
ImageNet classification checkpoint loads into ``body`` as it is. ``res2``..``res5`` are the
outputs of ``layer1``..``layer4`` (strides 4, 8, 16, 32; channels 256, 512, 1024, 2048; ResNet-18 / 34,
torchvision's basic-block ResNets, as Detectron2's ``RES2_OUT_CHANNELS: 64``: 64, 128, 256, 512).

Both libraries put the stride of a bottleneck on its 3x3 conv (``STRIDE_IN_1X1: False`` in
Detectron2 terms), which is what the official SparseInst / FastInst configs use with the
torchvision-converted ImageNet weights.

Deformable convs (``DEFORM_ON_PER_STAGE``): each bottleneck's ``conv2`` of a chosen stage becomes a
:class:`DeformConv` that owns its offset conv (``conv2.weight``, ``conv2.offset.weight/bias``).
The official R50-vd-DCN (SparseInst / FastInst) is unmodulated, 18 offset channels, on res4 and
res5: 23,971,842 backbone parameters with FrozenBN (``tests/refs/README.md``, docs/sparseinst.md).

Zero-init residual (``MODEL.RESNETS.ZERO_INIT_RESIDUAL``, default False = Detectron2, as the
official SparseInst / FastInst): from random weights, the scale of the last norm of every
bottleneck (``bn3``) starts at 0, so each residual branch starts as the identity (mmdetection's
``ResNet(zero_init_residual=True)`` default, which QueryInst's config keeps). It acts on trainable
norms only (BN / SyncBN / GN); FrozenBN is meant for pretrained weights, whose values replace
every scale anyway, and a frozen 0 would switch the branches off for good. With pretrained
weights (``PRETRAINED`` or a checkpoint loaded afterwards) the option changes nothing. The
library's own zero-init (timm's ``zero_init_last``, on by default) is turned off so that the
option alone decides, for both variants.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torchvision
from torch import nn

from ..layers import DeformConv
from ..norm import NORM_NAMES, convert_norm
from ..registry import BACKBONE_REGISTRY
from .base import Backbone, ShapeSpec

__all__ = [
    "DeformConv",
    "ResNetBackbone",
    "build_resnet_backbone",
    "build_resnet_vd_backbone",
    "freeze_modules",
    "zero_init_residual_norms",
]

logger = logging.getLogger(__name__)

RESNET_STAGES = ("res2", "res3", "res4", "res5")
_STAGE_TO_LAYER = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
_RESNET_CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
_RESNET_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_BASIC_CHANNELS = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}  # ResNet-18 / 34 (basic blocks)
_DEPTHS = (18, 34, 50, 101, 152)
_BASIC_DEPTHS = (18, 34)
VARIANTS = ("torchvision", "vd")

PRETRAINED_HINT = (
    "Set MODEL.BACKBONE.PRETRAINED False and give the weights as a local file instead: "
    "MODEL.WEIGHTS /path/to/checkpoint (a full model), or "
    "instseg.checkpoint.load_backbone_weights(backbone, '/path/to/imagenet_classifier.pth') "
    "(a torchvision/timm ImageNet state dict)."
)


def freeze_modules(modules: Sequence[nn.Module]) -> None:
    """``requires_grad = False`` on every parameter of ``modules`` (batch norms of frozen stages
    are turned into FrozenBN separately, see :meth:`ResNetBackbone._freeze`)."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _create_body(depth: int, variant: str, pretrained: bool) -> nn.Module:
    """The library ResNet (classifier and global pool removed), with ImageNet weights if asked.

    torchvision: ``resnet{depth}(weights="IMAGENET1K_V1")`` (the weights Detectron2's
    ``torchvision/R-50.pkl`` was converted from); timm: ``resnet{depth}d`` with its default
    pretrained tag (``resnet50d.ra2_in1k`` = the ``resnet50d_ra2-464e36ba.pth`` FastInst converts).

    Raises:
        ValueError: unsupported depth or variant.
        RuntimeError: ``pretrained`` and the weights could not be fetched (no network, ...).
    """
    if depth not in _DEPTHS:
        raise ValueError(f"ResNet depth {depth} is not supported; expected one of {_DEPTHS}")
    if variant not in VARIANTS:
        raise ValueError(f"ResNet variant '{variant}' unknown; expected one of {VARIANTS}")
    if variant == "vd" and depth in _BASIC_DEPTHS:
        raise ValueError(f"ResNet-D (variant 'vd') is built for depths 50 / 101 / 152, not {depth}")
    if variant == "torchvision":
        name = f"torchvision.models.resnet{depth}"
        builder = getattr(torchvision.models, f"resnet{depth}")
        try:
            model = builder(weights="IMAGENET1K_V1" if pretrained else None)
        except Exception as e:  # URLError, HTTPError, hash mismatch, ...
            if not pretrained:
                raise
            raise RuntimeError(
                f"Could not load the ImageNet weights of {name} (MODEL.BACKBONE.PRETRAINED True): "
                f"{type(e).__name__}: {e}. Downloading needs network access. {PRETRAINED_HINT}"
            ) from e
        del model.fc
        del model.avgpool
    else:
        import timm

        name = f"resnet{depth}d"
        try:
            # zero_init_last=False: MODEL.RESNETS.ZERO_INIT_RESIDUAL decides (see the module docstring)
            model = timm.create_model(name, pretrained=pretrained, zero_init_last=False)
        except Exception as e:
            if not pretrained:
                raise
            raise RuntimeError(
                f"Could not load the ImageNet weights of timm '{name}' (MODEL.BACKBONE.PRETRAINED True): "
                f"{type(e).__name__}: {e}. Downloading needs network access. {PRETRAINED_HINT}"
            ) from e
        del model.fc
        del model.global_pool
    return model


def zero_init_residual_norms(body: nn.Module) -> int:
    """Set to 0 the scale of the last norm (``bn3`` of a bottleneck, ``bn2`` of a basic block) of
    every block of ``body`` whose norm is trainable (BN / SyncBN / GN; FrozenBN is left alone).
    Returns how many were set."""
    n = 0
    with torch.no_grad():
        for layer_name in _STAGE_TO_LAYER.values():
            for block in getattr(body, layer_name, ()):
                norm = getattr(block, "bn3", None) if hasattr(block, "bn3") else getattr(block, "bn2", None)
                if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and norm.weight is not None:
                    norm.weight.zero_()
                    n += 1
    return n


class ResNetBackbone(Backbone):
    """ResNet-18/34/50/101/152 (torchvision) or ResNet-D (timm ``resnet*d``) returning ``res2``..``res5``.

    Args:
        depth: 18, 34 (basic blocks, torchvision only), 50, 101 or 152.
        norm: ``"FrozenBN"`` (default), ``"BN"``, ``"SyncBN"`` or ``"GN"`` (see :mod:`instseg.modeling.norm`).
        out_features: names among ``res2``..``res5`` to return; stages after the last one are not
            kept (as in Detectron2, so that DDP sees no unused parameters).
        freeze_at: 0 nothing frozen, 1 the stem, 2 stem + res2, ..., 5 everything (Detectron2).
            Frozen parameters get ``requires_grad = False`` and the batch norms of frozen stages
            become FrozenBN.
        deform_on_per_stage: 4 booleans for ``[res2, res3, res4, res5]``: replace every
            bottleneck's 3x3 ``conv2`` of that stage by a :class:`DeformConv`.
        deform_modulated: DCNv2 (27-channel offset conv incl. mask) if True, else 18 channels.
        deform_num_groups: deformable (offset) groups.
        pretrained: load ImageNet weights through torchvision / timm (network on first use).
        variant: ``"torchvision"`` (7x7 stem, strided 1x1 shortcut) or ``"vd"`` (timm ResNet-D:
            3-conv 32-32-64 stem, average-pool shortcut).
        zero_init_residual: from random weights (``pretrained`` False), start the scale of each
            bottleneck's last norm at 0 (mmdetection's default); BN / SyncBN / GN only, see the
            module docstring. False (default): every norm scale starts at 1 (Detectron2).

    Forward: ``(B, 3, H, W)`` float (normalized) -> ``{name: (B, C, ceil(H/s), ceil(W/s))}`` for
    each requested name, with ``C, s`` from :meth:`output_shape`.

    Raises:
        ValueError: unknown depth / norm / feature name, or a bad ``freeze_at``.
        RuntimeError: ``pretrained`` and the weights cannot be fetched (message suggests a local file).
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "FrozenBN",
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_at: int = 0,
        deform_on_per_stage: Sequence[bool] = (False, False, False, False),
        deform_modulated: bool = True,
        deform_num_groups: int = 1,
        pretrained: bool = False,
        variant: str = "torchvision",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        out_features = list(out_features)
        if not out_features:
            raise ValueError("out_features is empty")
        for f in out_features:
            if f not in RESNET_STAGES:
                raise ValueError(f"Unknown ResNet feature '{f}'; expected some of {list(RESNET_STAGES)}")
        if norm not in NORM_NAMES or norm == "":
            raise ValueError(f"Unknown ResNet norm '{norm}'; expected one of ['FrozenBN', 'BN', 'SyncBN', 'GN']")
        if not 0 <= int(freeze_at) <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        deform_on_per_stage = list(deform_on_per_stage)
        if len(deform_on_per_stage) != 4:
            raise ValueError(f"deform_on_per_stage needs 4 booleans [res2..res5], got {deform_on_per_stage}")
        if depth in _BASIC_DEPTHS and any(deform_on_per_stage):
            # Detectron2 refuses it too (BasicBlock has no deformable variant)
            raise ValueError(f"deformable convs (DEFORM_ON_PER_STAGE) need a bottleneck ResNet (depth >= 50), not {depth}")

        self.depth, self.norm, self.variant = depth, norm, variant
        self.zero_init_residual = bool(zero_init_residual)
        self.freeze_at = int(freeze_at)
        self._out_features = [f for f in RESNET_STAGES if f in out_features]  # network order

        body = _create_body(depth, variant, pretrained)
        # Stages after the last requested one are dropped (Detectron2 does not build them).
        last = max(RESNET_STAGES.index(f) for f in out_features)
        for stage in RESNET_STAGES[last + 1 :]:
            delattr(body, _STAGE_TO_LAYER[stage])

        body = convert_norm(body, norm)
        if self.zero_init_residual and not pretrained:
            zero_init_residual_norms(body)
        for stage, on in zip(RESNET_STAGES, deform_on_per_stage):
            layer_name = _STAGE_TO_LAYER[stage]
            if on and hasattr(body, layer_name):
                for block in getattr(body, layer_name):
                    block.conv2 = DeformConv.from_conv(
                        block.conv2, modulated=bool(deform_modulated), deformable_groups=int(deform_num_groups)
                    )
        self.body = body
        self._freeze(self.freeze_at)

    # ------------------------------------------------------------------ helpers
    def stage_modules(self) -> List[List[nn.Module]]:
        """Modules of ``[stem, res2, res3, res4, res5]`` (stages that were dropped give ``[]``)."""
        stem = [self.body.conv1, self.body.bn1]
        stages = [stem]
        for stage in RESNET_STAGES:
            layer = getattr(self.body, _STAGE_TO_LAYER[stage], None)
            stages.append([layer] if layer is not None else [])
        return stages

    def _freeze(self, freeze_at: int) -> None:
        if freeze_at <= 0:
            return
        # Batch norms of frozen stages become FrozenBN (Detectron2's ResNet.freeze()).
        if self.norm in ("BN", "SyncBN"):
            if freeze_at >= 1:
                self.body.conv1 = convert_norm(self.body.conv1, "FrozenBN")
                self.body.bn1 = convert_norm(self.body.bn1, "FrozenBN")
            for idx, stage in enumerate(RESNET_STAGES, start=2):
                layer_name = _STAGE_TO_LAYER[stage]
                if freeze_at >= idx and hasattr(self.body, layer_name):
                    setattr(self.body, layer_name, convert_norm(getattr(self.body, layer_name), "FrozenBN"))
        freeze_modules([m for stage in self.stage_modules()[:freeze_at] for m in stage])

    # ------------------------------------------------------------------ API
    @classmethod
    def from_config(cls, cfg, variant: str = "torchvision", out_features: Optional[Sequence[str]] = None) -> "ResNetBackbone":
        """Build from ``MODEL.RESNETS.*`` (``ZERO_INIT_RESIDUAL`` included) and
        ``MODEL.BACKBONE.{FREEZE_AT, PRETRAINED}``.

        ``out_features`` overrides ``MODEL.RESNETS.OUT_FEATURES`` (the FPN builder uses its own).
        """
        r = cfg.MODEL.RESNETS
        return cls(
            depth=r.DEPTH,
            norm=r.NORM,
            out_features=list(out_features) if out_features is not None else list(r.OUT_FEATURES),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            deform_on_per_stage=list(r.DEFORM_ON_PER_STAGE),
            deform_modulated=r.DEFORM_MODULATED,
            deform_num_groups=r.DEFORM_NUM_GROUPS,
            pretrained=cfg.MODEL.BACKBONE.PRETRAINED,
            variant=variant,
            zero_init_residual=r.ZERO_INIT_RESIDUAL,
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{"res2": (B, 256, H/4, W/4), ..., "res5": (B, 2048, H/32, W/32)}``
        (only the requested names; sizes rounded up)."""
        if x.dim() != 4:
            raise ValueError(f"ResNet input must be (B, C, H, W), got shape {tuple(x.shape)}")
        outputs: Dict[str, torch.Tensor] = {}
        layer_to_stage = {v: k for k, v in _STAGE_TO_LAYER.items()}
        for name, module in self.body.named_children():
            x = module(x)
            stage = layer_to_stage.get(name)
            if stage in self._out_features:
                outputs[stage] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{"res2": ShapeSpec(256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}``
        (ResNet-18 / 34: 64, 128, 256, 512 channels) restricted to the requested features."""
        channels = _BASIC_CHANNELS if self.depth in _BASIC_DEPTHS else _RESNET_CHANNELS
        return {f: ShapeSpec(channels=channels[f], stride=_RESNET_STRIDES[f]) for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg) -> ResNetBackbone:
    """torchvision ResNet-``MODEL.RESNETS.DEPTH`` (FrozenBN R50: 23,454,912 parameters)."""
    return ResNetBackbone.from_config(cfg, variant="torchvision")


@BACKBONE_REGISTRY.register()
def build_resnet_vd_backbone(cfg) -> ResNetBackbone:
    """timm ResNet-D (``resnet50d`` / ``resnet101d``), e.g. SparseInst / FastInst R50-vd-DCN with
    ``DEFORM_ON_PER_STAGE [False, False, True, True]`` and ``DEFORM_MODULATED False``
    (23,971,842 parameters with FrozenBN)."""
    return ResNetBackbone.from_config(cfg, variant="vd")
