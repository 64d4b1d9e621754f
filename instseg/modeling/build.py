"""``build_model(cfg)``: the meta-architecture named by ``MODEL.META_ARCHITECTURE``."""
from __future__ import annotations

import torch

from ..discovery import discover_models
from .registry import META_ARCH_REGISTRY

__all__ = ["build_model"]


def build_model(cfg) -> torch.nn.Module:
    """Build ``cfg.MODEL.META_ARCHITECTURE`` and move it to ``cfg.MODEL.DEVICE``.

    The installed model packages are loaded first (:func:`instseg.discovery.discover_models`), so
    this works in a process that imported nothing but instseg (e.g. with a config read back from
    a dumped ``config.yaml``).

    Raises:
        KeyError: the meta-architecture is not registered (the message lists the registered ones).
        ValueError: ``MODEL.NUM_CLASSES`` is still -1 (see :func:`instseg.data.resolve_num_classes`).
        instseg.discovery.ModelPackageImportError: a declared model package fails to import.
    """
    discover_models()
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        known = sorted(k for k, _ in META_ARCH_REGISTRY)
        raise KeyError(f"MODEL.META_ARCHITECTURE '{name}' is not registered; known: {known}")
    if cfg.MODEL.NUM_CLASSES <= 0:
        raise ValueError(
            "MODEL.NUM_CLASSES is not set: call instseg.data.resolve_num_classes(cfg) with a "
            "registered dataset in DATASETS.TRAIN/TEST, or set MODEL.NUM_CLASSES"
        )
    model = META_ARCH_REGISTRY.get(name)(cfg)
    device = cfg.MODEL.DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(torch.device(device))
