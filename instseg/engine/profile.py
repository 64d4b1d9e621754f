"""``instseg-train --profile N``: where one training iteration's time goes.

:func:`profile_training` runs ``num_warmup`` + ``num_iter`` training iterations of ``cfg`` in this
process, outside Lightning, with the pieces the Trainer uses (``build_train_loader``, the model of
:class:`instseg.engine.InstSegModule` with ``MODEL.WEIGHTS`` loaded as training loads it,
``build_optimizer``, ``SOLVER.CLIP_GRADIENTS``), and times each stage of every timed iteration:

- ``data``: waiting for the next batch from the loader (with ``DATALOADER.NUM_WORKERS > 0`` only
  the wait: a large value means the workers are starved);
- ``matching``: the criteria's matching of predictions to ground truth (cost matrices and the
  Hungarian assignment; every model marks it with :func:`instseg.utils.profiling.region`);
- ``forward + loss``: the rest of ``model(batch)`` (network, target preparation, losses);
- ``backward``: ``sum(losses).backward()``;
- ``optimizer``: gradient clipping, ``optimizer.step()`` and ``zero_grad``.

Times are wall-clock milliseconds (``time.perf_counter``; CUDA synchronized around each stage).
The LR schedule is not stepped (the base LR throughout: the cost of a step does not depend on it),
and AMP is not applied (``SOLVER.AMP.ENABLED`` is reported, not used). Nothing is written to
``OUTPUT_DIR``.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Dict, List

import torch

__all__ = ["PROFILE_STAGES", "profile_training", "format_profile"]

logger = logging.getLogger(__name__)

#: The stages of :func:`profile_training`, in iteration order.
PROFILE_STAGES = ("data", "forward + loss", "matching", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_training(cfg, num_iter: int = 10, num_warmup: int = 2) -> Dict:
    """Time ``num_iter`` training iterations of ``cfg`` (after ``num_warmup``) stage by stage.

    Args:
        cfg: a set-up config (``MODEL.NUM_CLASSES`` resolved, datasets registered).
        num_iter: timed iterations (>= 1). num_warmup: untimed ones first (>= 0).

    Returns:
        ``{"model", "device", "threads", "torch", "batch_size", "num_workers", "num_iter",
        "num_warmup", "amp_enabled", "stages": {stage: {"median_ms", "mean_ms", "share"}},
        "total": {"median_ms", "mean_ms"}, "per_iter_ms": {stage: [...]}}``; ``share`` is the
        stage's mean over the mean iteration time (the shares add up to 1).

    Raises:
        ValueError: ``num_iter < 1`` or ``num_warmup < 0``.
    """
    if num_iter < 1 or num_warmup < 0:
        raise ValueError(f"--profile needs num_iter >= 1 and num_warmup >= 0, got {num_iter}, {num_warmup}")
    from instseg.data import build_train_loader
    from instseg.utils.profiling import collect_regions

    from .launch import _load_initial_weights
    from .module import InstSegModule
    from .optim import build_optimizer, clip_gradients

    module = InstSegModule(cfg)
    _load_initial_weights(module, cfg.MODEL.WEIGHTS, strict=False)
    model = module.model
    device = torch.device(cfg.MODEL.DEVICE)
    model.to(device).train()
    optimizer = build_optimizer(cfg, model)
    loader = iter(build_train_loader(cfg))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_iter: Dict[str, List[float]] = {s: [] for s in PROFILE_STAGES}
    totals: List[float] = []
    for it in range(num_warmup + num_iter):
        _sync(device)
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        with collect_regions() as regions:
            losses = model(batch)
            _sync(device)
        t2 = time.perf_counter()
        total_loss = sum(losses.values())
        total_loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        clip_gradients(params, cfg.SOLVER.CLIP_GRADIENTS)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        if it < num_warmup:
            continue
        matching = regions.get("matching", 0.0)
        for stage, sec in zip(PROFILE_STAGES, (t1 - t0, t2 - t1 - matching, matching, t3 - t2, t4 - t3)):
            per_iter[stage].append(sec * 1000.0)
        totals.append((t4 - t0) * 1000.0)
        logger.info("profile iteration %d/%d: %.1f ms (loss %.4f)", it - num_warmup + 1, num_iter, totals[-1],
                    float(total_loss.detach()))
    mean_total = statistics.fmean(totals)
    return {
        "model": cfg.MODEL.META_ARCHITECTURE,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": int(cfg.SOLVER.IMS_PER_BATCH),
        "num_workers": int(cfg.DATALOADER.NUM_WORKERS),
        "num_iter": int(num_iter),
        "num_warmup": int(num_warmup),
        "amp_enabled": bool(cfg.SOLVER.AMP.ENABLED),
        "stages": {s: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v),
                       "share": statistics.fmean(v) / mean_total if mean_total > 0 else 0.0}
                   for s, v in per_iter.items()},
        "total": {"median_ms": statistics.median(totals), "mean_ms": mean_total},
        "per_iter_ms": per_iter,
    }


def format_profile(report: Dict) -> str:
    """The report of :func:`profile_training` as a Markdown table with a header line."""
    lines = [
        f"training iteration profile: {report['model']} on {report['device']} ({report['threads']} threads, "
        f"torch {report['torch']}), batch {report['batch_size']}, {report['num_workers']} loader workers, "
        f"{report['num_iter']} iterations after {report['num_warmup']} warm-up"
        + (" (AMP is on in the config; this profile runs in float32)" if report["amp_enabled"] else ""),
        "",
        "| stage | median ms | mean ms | share |",
        "| --- | --- | --- | --- |",
    ]
    for stage, v in report["stages"].items():
        lines.append(f"| {stage} | {v['median_ms']:.1f} | {v['mean_ms']:.1f} | {v['share'] * 100:.1f} % |")
    t = report["total"]
    lines.append(f"| iteration | {t['median_ms']:.1f} | {t['mean_ms']:.1f} | 100 % |")
    return "\n".join(lines)
