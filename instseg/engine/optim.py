"""Optimizer and iteration-based LR schedule from the config (Detectron2 semantics).

Parameter groups: backbone parameters get ``BASE_LR * SOLVER.BACKBONE_MULTIPLIER``; normalization
parameters get ``WEIGHT_DECAY_NORM``, embeddings (``nn.Embedding`` weights and parameters whose
name ends in ``pos_embed``/``query_embed``) ``WEIGHT_DECAY_EMBED``, biases ``WEIGHT_DECAY_BIAS``
(``None`` = ``WEIGHT_DECAY``), everything else ``WEIGHT_DECAY``. The optimizer gets one group per
distinct ``(lr, weight_decay)`` pair (:func:`merge_param_groups`): AdamW and SGD update each
parameter independently of the grouping, so the steps are the same as with one group per
parameter, with a handful of groups instead of hundreds.

Gradient clipping (:func:`clip_gradients`, ``SOLVER.CLIP_GRADIENTS``): ``"value"`` clamps every
gradient element to ``[-CLIP_VALUE, CLIP_VALUE]``; ``"norm"`` rescales all gradients together so
that their total ``NORM_TYPE``-norm is at most ``CLIP_VALUE``.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List

import torch
from torch import nn

__all__ = ["build_optimizer", "build_lr_lambda", "get_param_groups", "merge_param_groups", "clip_gradients"]

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
    """One group per trainable parameter with its ``lr``, ``weight_decay`` and ``name``; frozen
    ones left out. (:func:`build_optimizer` merges them with :func:`merge_param_groups`.)"""
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


def merge_param_groups(groups: List[Dict]) -> List[Dict]:
    """Merge the groups with equal ``(lr, weight_decay)`` into one.

    Groups are ordered by their first parameter (the order of ``groups``), parameters keep their
    order within a group; ``"names"`` lists the merged groups' ``"name"`` (when they have one).
    """
    merged: Dict = {}
    for g in groups:
        key = (float(g["lr"]), float(g["weight_decay"]))
        m = merged.setdefault(key, {"params": [], "lr": g["lr"], "weight_decay": g["weight_decay"], "names": []})
        m["params"].extend(g["params"])
        if "name" in g:
            m["names"].append(g["name"])
    return list(merged.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (``SOLVER.OPTIMIZER == "ADAMW"``, with ``AMSGRAD``) or SGD (``MOMENTUM``, ``NESTEROV``),
    one parameter group per distinct ``(lr, weight_decay)`` (see :func:`merge_param_groups`).

    Raises:
        ValueError: unknown optimizer name, or no trainable parameter.
    """
    groups = merge_param_groups(get_param_groups(cfg, model))
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


def clip_gradients(parameters: Iterable[torch.Tensor], clip_cfg) -> None:
    """Clip the gradients of ``parameters`` in place as ``SOLVER.CLIP_GRADIENTS`` says (nothing
    when not ``ENABLED``): ``CLIP_TYPE "value"`` clamps each element to ``[-CLIP_VALUE,
    CLIP_VALUE]`` (``torch.nn.utils.clip_grad_value_``); ``"norm"`` scales all gradients by
    ``min(1, CLIP_VALUE / total_norm)``, ``total_norm`` being the ``NORM_TYPE``-norm of all of them
    together (``torch.nn.utils.clip_grad_norm_``; ``inf`` = max-abs).

    Raises:
        ValueError: unknown ``CLIP_TYPE``.
    """
    if not clip_cfg.ENABLED:
        return
    params = [p for p in parameters if p.grad is not None]
    kind = str(clip_cfg.CLIP_TYPE).lower()
    if kind == "value":
        torch.nn.utils.clip_grad_value_(params, float(clip_cfg.CLIP_VALUE))
    elif kind == "norm":
        torch.nn.utils.clip_grad_norm_(params, float(clip_cfg.CLIP_VALUE), norm_type=float(clip_cfg.NORM_TYPE))
    else:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'value' or 'norm', got {clip_cfg.CLIP_TYPE!r}")
