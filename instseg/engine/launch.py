"""Training and evaluation entry points used by ``tools/train_net.py`` and ``tools/eval_net.py``.

Detectron2's ``default_setup`` + ``DefaultTrainer`` rebuilt on Lightning: the Trainer gives the
loop, DDP (one or many machines; gloo on CPU), AMP (fp16/bf16), gradient clipping (done by
:class:`InstSegModule` from ``SOLVER.CLIP_GRADIENTS``), periodic checkpoints (written atomically),
TensorBoard/CSV logs and a progress bar with ETA.

Evaluation covers every dataset of ``DATASETS.TEST``; results are
``{dataset_name: {"segm": {...}, "bbox": {...}}}``. Files written (rank 0) at each evaluation:
``OUTPUT_DIR/inference/<dataset_name>/coco_instances_results.json`` and ``.../metrics.json``
(that dataset), and ``OUTPUT_DIR/metrics.json`` (all datasets, the returned structure).
"""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import Dict, Optional
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .callbacks import AtomicCheckpointIO, DDPConsistencyRecord, IterationProgressBar, RNGStateCallback
from .module import InstSegDataModule, InstSegModule

__all__ = ["setup_cfg_from_args", "default_setup", "build_trainer", "train", "evaluate", "last_checkpoint", "setup_logging"]

logger = logging.getLogger("instseg")


def setup_cfg_from_args(args, freeze: bool = True):
    """Config for a tool: register ``--dataset`` entries, import every model package (so their
    keys and meta-architectures are registered), merge ``--config-file`` and ``opts``, and resolve
    ``MODEL.NUM_CLASSES`` from the dataset (an error names both numbers when they disagree)."""
    from ..config import setup_cfg
    from ..data import resolve_num_classes
    from ..utils.cli import register_cli_datasets
    from .models import import_model_packages

    import_model_packages()
    register_cli_datasets(args)
    cfg = setup_cfg(args.config_file, args.opts or [], freeze=False)
    resolve_num_classes(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def setup_logging(output_dir: Optional[str] = None, rank: int = 0) -> None:
    """Log INFO to stdout (rank 0) and to ``OUTPUT_DIR/log.txt`` (``log.rank<N>.txt`` for others)."""
    root = logging.getLogger("instseg")
    root.setLevel(logging.INFO)
    root.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers) and rank == 0:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        root.addHandler(h)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "log.txt" if rank == 0 else f"log.rank{rank}.txt")
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(fmt)
            root.addHandler(fh)


def default_setup(cfg, args=None) -> int:
    """Create OUTPUT_DIR, set up logging, dump the config, seed everything. Returns the seed."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    setup_logging(cfg.OUTPUT_DIR, rank)
    seed = cfg.SEED if cfg.SEED >= 0 else random.SystemRandom().randrange(2**31)
    if rank == 0:
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        if args is not None:
            logger.info("Command line arguments: %s", vars(args))
        logger.info("Using seed %d%s", seed, "" if cfg.SEED >= 0 else " (drawn at random; set SEED to fix it)")
    L.seed_everything(seed, workers=True, verbose=False)
    if cfg.CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True
    return seed


def last_checkpoint(output_dir: str) -> Optional[str]:
    """``OUTPUT_DIR/last.ckpt`` if it exists, else None."""
    path = os.path.join(output_dir, "last.ckpt")
    return path if os.path.isfile(path) else None


class _LossLogger(Callback):
    """Detectron2-style text log of the losses every ``period`` iterations (and the first)."""

    def __init__(self, period: int):
        self.period = max(int(period), 1)
        self._t0 = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module):
        import time

        self._t0, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = trainer.global_step  # already incremented
        if trainer.global_rank != 0 or not (it == 1 or it % self.period == 0 or it == trainer.max_steps):
            return
        m = {k[len("train/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        parts = "  ".join(f"{k}: {v:.4g}" for k, v in sorted(m.items()))
        import datetime
        import time

        done = it - self._start_step
        sec = (time.perf_counter() - self._t0) / max(done, 1)
        eta = datetime.timedelta(seconds=int(sec * max(trainer.max_steps - it, 0)))
        logger.info("eta: %s  iter: %d/%d  %s  time/iter: %.3fs", eta, it, trainer.max_steps, parts, sec)


def _precision(cfg) -> str:
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    p = cfg.SOLVER.AMP.PRECISION.lower()
    if p not in ("fp16", "bf16"):
        raise ValueError(f"SOLVER.AMP.PRECISION must be fp16 or bf16, got '{cfg.SOLVER.AMP.PRECISION}'")
    return "16-mixed" if p == "fp16" else "bf16-mixed"


def build_trainer(cfg, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "", extra_callbacks=()) -> L.Trainer:
    """A Lightning Trainer configured from ``cfg`` (see module docstring).

    ``num_gpus`` is the number of processes per machine: GPUs on CUDA, gloo processes on CPU
    (``MODEL.DEVICE cpu``). ``dist_url`` ``tcp://HOST:PORT`` sets the rendezvous for
    multi-machine runs.
    """
    device = cfg.MODEL.DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    world = num_gpus * num_machines
    if world > 1 or num_machines > 1:
        strategy = "ddp_find_unused_parameters_true" if accelerator == "gpu" else "ddp"
        if dist_url:
            u = urlparse(dist_url)
            if u.hostname:
                os.environ.setdefault("MASTER_ADDR", u.hostname)
            if u.port:
                os.environ.setdefault("MASTER_PORT", str(u.port))
        os.environ.setdefault("NODE_RANK", str(machine_rank))
    else:
        strategy = "auto"
    period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
    ckpt = ModelCheckpoint(
        dirpath=cfg.OUTPUT_DIR,
        filename="model_{step:07d}",
        every_n_train_steps=period if period > 0 else None,
        save_top_k=-1,
        save_last=True,
        save_on_train_epoch_end=False,
        auto_insert_metric_name=False,
    )
    eval_period = int(cfg.TEST.EVAL_PERIOD)
    has_test = len(cfg.DATASETS.TEST) > 0
    callbacks = [ckpt, RNGStateCallback(), IterationProgressBar(refresh_rate=1 if sys.stdout.isatty() else max(1, int(cfg.LOG_PERIOD))),
                 _LossLogger(cfg.LOG_PERIOD), DDPConsistencyRecord(cfg.OUTPUT_DIR)] + list(extra_callbacks)
    return L.Trainer(
        accelerator=accelerator,
        devices=num_gpus if accelerator == "gpu" or world > 1 else 1,
        num_nodes=num_machines,
        strategy=strategy,
        precision=_precision(cfg),
        max_steps=int(cfg.SOLVER.MAX_ITER),
        max_epochs=-1,
        val_check_interval=eval_period if (has_test and eval_period > 0) else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if (has_test and eval_period > 0) else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=[TensorBoardLogger(cfg.OUTPUT_DIR, name="tensorboard", version=""),
                CSVLogger(cfg.OUTPUT_DIR, name="csv")],  # csv/version_N per (resumed) run: nothing overwritten
        log_every_n_steps=max(1, int(cfg.LOG_PERIOD)),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        use_distributed_sampler=False,  # our samplers shard per rank themselves
        benchmark=bool(cfg.CUDNN_BENCHMARK),
    )


def _load_initial_weights(module: InstSegModule, weights: str) -> None:
    if not weights:
        return
    from ..checkpoint import load_checkpoint

    report = load_checkpoint(module.model, weights)
    logger.info(
        "Loaded %s: %d tensors, %d skipped (shape), %d missing, %d unexpected", weights,
        len(report.get("loaded", [])), len(report.get("skipped_shape", [])),
        len(report.get("missing", [])), len(report.get("unexpected", [])),
    )


def _check_dataset_files(names) -> None:
    """Fail before training, not after it, when a dataset's json file is missing."""
    from ..data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name not in DatasetCatalog:
            raise KeyError(f"Dataset '{name}' is not registered; registered: {sorted(DatasetCatalog.list())}")
        meta = MetadataCatalog.get(name)
        json_file = getattr(meta, "json_file", None)  # lazy for the smoke set: generates it
        if json_file and not os.path.isfile(json_file):
            raise FileNotFoundError(f"Dataset '{name}': json file not found: {json_file}")


def train(cfg, resume: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "") -> Dict:
    """Train ``cfg`` to ``SOLVER.MAX_ITER``; returns the final evaluation of every dataset of
    ``DATASETS.TEST``, ``{dataset_name: {"segm": {"AP", "AP50", ...}, "bbox": {...}}}`` (``{}``
    without a test set, and on ranks other than 0).

    With ``resume``, continues from ``OUTPUT_DIR/last.ckpt`` at its iteration, with optimizer,
    scheduler and RNG state; when there is none it says so and starts from MODEL.WEIGHTS.
    """
    _check_dataset_files(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    module = InstSegModule(cfg)
    data = InstSegDataModule(cfg)
    ckpt_path = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    if resume and ckpt_path is None:
        logger.warning("--resume: no checkpoint in %s; starting from iteration 0 (MODEL.WEIGHTS=%r)", cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS)
    if ckpt_path is None:
        _load_initial_weights(module, cfg.MODEL.WEIGHTS)
    else:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0)
        logger.info("Resuming from %s at iteration %d", ckpt_path, step)
    trainer = build_trainer(cfg, num_gpus, num_machines, machine_rank, dist_url)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    trainer.save_checkpoint(os.path.join(cfg.OUTPUT_DIR, "model_final.ckpt"))  # rank 0 writes; collective in DDP
    results = {}
    if cfg.DATASETS.TEST:
        trainer.limit_val_batches = 1.0
        trainer.validate(module, datamodule=data, verbose=False)
        results = module.eval_results
        if trainer.global_rank == 0:
            for name, res in results.items():
                logger.info("Final evaluation on %s: %s", name, _fmt(res))
    return results


def evaluate(cfg, num_gpus: int = 1, per_category: bool = False) -> Dict:
    """COCO evaluation of ``MODEL.WEIGHTS`` on every dataset of ``DATASETS.TEST``.

    Returns:
        ``{dataset_name: {"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"[, "AP-<category>"
        ...]}, "bbox": {...}}}`` on rank 0 (``{}`` on other ranks); files as in the module
        docstring.
    """
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: nothing to evaluate")
    _check_dataset_files(list(cfg.DATASETS.TEST))
    module = InstSegModule(cfg, per_category=per_category)
    _load_initial_weights(module, cfg.MODEL.WEIGHTS)
    trainer = build_trainer(cfg, num_gpus)
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=InstSegDataModule(cfg), verbose=False)
    results = module.eval_results
    if trainer.global_rank == 0:
        for name, res in results.items():
            logger.info("Evaluation on %s: %s", name, _fmt(res))
    return results


def _fmt(results: Dict) -> str:
    return "; ".join(
        f"{task}: " + ", ".join(f"{k}={v:.2f}" for k, v in m.items() if "-" not in k) for task, m in results.items()
    )
