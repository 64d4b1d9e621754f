"""Registries (fvcore) for meta-architectures and backbones, Detectron2 style."""
from fvcore.common.registry import Registry

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """Meta-architectures: ``cls(cfg)`` returns an ``nn.Module`` that follows the
data contract of docs/architecture.md (list of dicts in; loss dict in training, one result dict per image in
eval)."""

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = """Backbones: ``fn(cfg) -> Backbone``; a Backbone returns a dict of named
feature maps (``res2``..``res5``) and exposes ``output_shape()`` with channels and strides."""
