"""Optimizer and iteration-based LR schedule from the config (Detectron2 semantics).

Parameter groups: backbone parameters get ``BASE_LR * SOLVER.BACKBONE_MULTIPLIER``; normalization
parameters get ``WEIGHT_DECAY_NORM``, embeddings (``nn.Embedding`` weights and parameters whose
name ends in ``pos_embed``/``query_embed``) ``WEIGHT_DECAY_EMBED``, biases ``WEIGHT_DECAY_BIAS``
(``None`` = ``WEIGHT_DECAY``), everything else ``WEIGHT_DECAY``.
"""
from __future__ import annotations

import bisect
from typing import Dict, List

import torch
from torch import nn

__all__ = ["build_optimizer", "build_lr_lambda", "get_param_groups"]

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.InstanceNorm2d,
)


def get_param_groups(cfg, model: nn.Module) -> List[Dict]:
    """One group per trainable parameter with its ``lr`` and ``weight_decay``; frozen ones left out."""
    s = cfg.SOLVER
    wd_bias = s.WEIGHT_DECAY if s.WEIGHT_DECAY_BIAS is None else s.WEIGHT_DECAY_BIAS
    groups, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if full.startswith("backbone.") or ".backbone." in full:
                lr = lr * s.BACKBONE_MULTIPLIER
            if isinstance(module, _NORM_TYPES):
                wd = s.WEIGHT_DECAY_NORM
            elif isinstance(module, nn.Embedding) or p_name.endswith(("pos_embed", "query_embed")):
                wd = s.WEIGHT_DECAY_EMBED
            elif p_name == "bias":
                wd = wd_bias
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": full})
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (``SOLVER.OPTIMIZER == "ADAMW"``, with ``AMSGRAD``) or SGD (``MOMENTUM``, ``NESTEROV``).

    Raises:
        ValueError: unknown optimizer name, or no trainable parameter.
    """
    groups = get_param_groups(cfg, model)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, amsgrad=cfg.SOLVER.AMSGRAD)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got '{cfg.SOLVER.OPTIMIZER}'")


def build_lr_lambda(cfg):
    """Multiplier of the base LR at iteration ``it``: linear (or constant) warm-up from
    ``WARMUP_FACTOR`` over ``WARMUP_ITERS``, times ``GAMMA ** (number of STEPS <= it)``."""
    s = cfg.SOLVER
    steps = sorted(int(x) for x in s.STEPS)
    warmup_iters, warmup_factor, method, gamma = int(s.WARMUP_ITERS), float(s.WARMUP_FACTOR), s.WARMUP_METHOD, float(s.GAMMA)
    if method not in ("linear", "constant"):
        raise ValueError(f"SOLVER.WARMUP_METHOD must be linear or constant, got '{method}'")

    def lr_lambda(it: int) -> float:
        factor = gamma ** bisect.bisect_right(steps, it)
        if it < warmup_iters:
            if method == "linear":
                alpha = it / warmup_iters
                factor *= warmup_factor * (1 - alpha) + alpha
            else:
                factor *= warmup_factor
        return factor

    return lr_lambda
