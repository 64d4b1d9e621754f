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

LR schedule (:func:`build_lr_lambda`): Detectron2's ``WarmupMultiStepLR`` as its
``build_lr_scheduler`` builds it (fvcore ``ParamScheduler`` classes evaluated at ``it / MAX_ITER``):
the warm-up lasts at most ``MAX_ITER`` iterations and ramps to the step schedule's value at its end.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch import nn

__all__ = [
    "build_optimizer",
    "build_lr_lambda",
    "build_param_scheduler",
    "WarmupParamScheduler",
    "get_param_groups",
    "merge_param_groups",
    "clip_gradients",
]

logger = logging.getLogger(__name__)

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


class WarmupParamScheduler(CompositeParamScheduler):
    """Detectron2's warm-up (``detectron2.solver.lr_scheduler.WarmupParamScheduler``) on fvcore's
    :class:`CompositeParamScheduler` (fvcore has none): a warm-up over the first
    ``warmup_length`` (a fraction of the run, in ``[0, 1]``) of ``scheduler``, then ``scheduler``
    itself on its own time axis.

    The warm-up starts at ``warmup_factor * scheduler(0)`` and, for ``"linear"``, ramps to
    ``scheduler(warmup_length)``, the schedule's value at the end of the warm-up (it does *not*
    multiply a warm-up factor by the schedule's current value); ``"constant"`` stays at the start
    value until the warm-up ends.
    """

    def __init__(self, scheduler: ParamScheduler, warmup_factor: float, warmup_length: float, warmup_method: str = "linear"):
        end_value = scheduler(warmup_length)
        start_value = warmup_factor * scheduler(0.0)
        if warmup_method == "constant":
            warmup = ConstantParamScheduler(start_value)
        elif warmup_method == "linear":
            warmup = LinearParamScheduler(start_value, end_value)
        else:
            raise ValueError(f"SOLVER.WARMUP_METHOD must be linear or constant, got '{warmup_method}'")
        super().__init__([warmup, scheduler], interval_scaling=["rescaled", "fixed"], lengths=[warmup_length, 1 - warmup_length])


def build_param_scheduler(cfg) -> ParamScheduler:
    """The LR multiplier as a function of the training progress ``where = it / MAX_ITER``, built
    as Detectron2's ``build_lr_scheduler`` builds ``WarmupMultiStepLR``: a fvcore
    :class:`MultiStepParamScheduler` (values ``GAMMA ** k``, milestones ``STEPS``, ``num_updates =
    MAX_ITER``) under a :class:`WarmupParamScheduler` of length ``min(WARMUP_ITERS / MAX_ITER, 1)``.

    ``STEPS`` at or after ``MAX_ITER`` are dropped with a warning (no training iteration reaches
    them; Detectron2 drops those after it and fvcore rejects one equal to it).

    Raises:
        ValueError: ``MAX_ITER < 1``, unknown ``WARMUP_METHOD``, or ``STEPS`` not positive and distinct.
    """
    s = cfg.SOLVER
    max_iter = int(s.MAX_ITER)
    if max_iter < 1:
        raise ValueError(f"SOLVER.MAX_ITER must be >= 1, got {s.MAX_ITER}")
    if s.WARMUP_METHOD not in ("linear", "constant"):
        raise ValueError(f"SOLVER.WARMUP_METHOD must be linear or constant, got '{s.WARMUP_METHOD}'")
    all_steps = sorted(int(x) for x in s.STEPS)
    steps = [x for x in all_steps if x < max_iter]
    if len(steps) != len(all_steps):
        logger.warning("SOLVER.STEPS %s at or after SOLVER.MAX_ITER=%d are ignored", [x for x in all_steps if x >= max_iter], max_iter)
    if any(x <= 0 for x in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"SOLVER.STEPS must be distinct positive iterations, got {tuple(s.STEPS)}")
    gamma = float(s.GAMMA)
    # fvcore wants num_updates >= len(values); with distinct positive steps < MAX_ITER that holds
    main = MultiStepParamScheduler(values=[gamma**k for k in range(len(steps) + 1)], milestones=steps, num_updates=max_iter)
    warmup_length = min(int(s.WARMUP_ITERS) / max_iter, 1.0)
    return WarmupParamScheduler(main, float(s.WARMUP_FACTOR), warmup_length, s.WARMUP_METHOD)


def build_lr_lambda(cfg):
    """Multiplier of the base LR at iteration ``it`` for :class:`torch.optim.lr_scheduler.LambdaLR`:
    :func:`build_param_scheduler` evaluated at ``it / MAX_ITER``, as Detectron2's ``LRMultiplier``
    does (``it`` past ``MAX_ITER`` gets the value at ``MAX_ITER``).

    Linear warm-up from ``WARMUP_FACTOR`` over ``min(WARMUP_ITERS, MAX_ITER)`` iterations to the
    step schedule's value at the warm-up's end (``GAMMA ** (number of STEPS <= that end)``), then
    ``GAMMA ** (number of STEPS <= it)``. When the warm-up ends before the first step this is the
    textbook ``(WARMUP_FACTOR * (1 - it / WARMUP_ITERS) + it / WARMUP_ITERS) * GAMMA ** k``.

    A plain function (not a callable object), so ``LambdaLR.state_dict()`` stores no schedule: a
    resumed run rebuilds it from the config and continues at the checkpoint's iteration.
    """
    sched = build_param_scheduler(cfg)
    max_iter = int(cfg.SOLVER.MAX_ITER)

    def lr_lambda(it: int) -> float:
        return float(sched(min(it / max_iter, 1.0)))

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
