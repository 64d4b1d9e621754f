"""Training and evaluation entry points used by ``tools/train_net.py`` and ``tools/eval_net.py``.

Detectron2's ``default_setup`` + ``DefaultTrainer`` rebuilt on Lightning: the Trainer gives the
loop, DDP (one or many machines; gloo on CPU), AMP (fp16/bf16), gradient clipping (done by
:class:`InstSegModule` from ``SOLVER.CLIP_GRADIENTS``), periodic checkpoints (written atomically),
TensorBoard/CSV logs and a progress bar with ETA.

Evaluation covers every dataset of ``DATASETS.TEST``; results are
``{dataset_name: {"segm": {...}, "bbox": {...}}}``. Files written (rank 0) at each evaluation:
``OUTPUT_DIR/inference/<dataset_name>/coco_instances_results.json`` and ``.../metrics.json``
(that dataset), and ``OUTPUT_DIR/metrics.json`` (all datasets, the returned structure).

Safety rules (docs/robustness.md): a new training run (no ``resume``) refuses an OUTPUT_DIR that
holds checkpoints of another run unless ``overwrite`` (:func:`check_output_dir`); an earlier
``config.yaml`` is never replaced silently (:func:`default_setup`); ``resume`` takes the newest
checkpoint that loads (:func:`find_resume_checkpoint`); evaluation refuses weights that do not
fill the model unless ``allow_partial_weights``; :func:`fatal_errors_logged` writes the traceback
of a fatal error to ``OUTPUT_DIR/log.txt``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .callbacks import (
    TMP_PREFIX,
    AtomicCheckpointIO,
    DDPConsistencyRecord,
    HousekeepingCheckpoint,
    IterationProgressBar,
    RNGStateCallback,
    periodic_checkpoints,
)
from .module import InstSegDataModule, InstSegModule

__all__ = [
    "setup_cfg_from_args",
    "default_setup",
    "build_trainer",
    "train",
    "evaluate",
    "last_checkpoint",
    "setup_logging",
    "check_output_dir",
    "find_resume_checkpoint",
    "fatal_errors_logged",
    "write_loss_curve",
    "OutputDirInUseError",
    "ResumeError",
]

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


def _env_rank() -> int:
    """This process's rank before the Trainer exists: ``RANK``, else ``LOCAL_RANK`` (non-zero on
    any machine but the first, ``NODE_RANK > 0``, counts as non-zero)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    return local if int(os.environ.get("NODE_RANK", 0) or 0) == 0 else local + 1


# checkpoints that belong to a training run (``-vN``: copies written by earlier versions)
_RUN_CHECKPOINT = re.compile(r"^(model_\d+|model_final|last)(-v\d+)?\.ckpt$")


class OutputDirInUseError(FileExistsError):
    """A new training run was asked to write into an OUTPUT_DIR holding another run's checkpoints."""


class ResumeError(RuntimeError):
    """``--resume`` found checkpoints in OUTPUT_DIR but none of them loads."""


def run_checkpoints(output_dir: str) -> List[str]:
    """Names of the checkpoint files of a training run in ``output_dir`` (``model_XXXXXXX.ckpt``,
    ``model_final.ckpt``, ``last.ckpt``, and ``-vN`` copies), sorted; ``[]`` if it does not exist."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if _RUN_CHECKPOINT.match(n))


def check_output_dir(output_dir: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start a new training run in an OUTPUT_DIR that holds another run's checkpoints.

    Reads only (call it before anything is written). Stale ``.tmp-*.ckpt`` files alone do not
    count (they are swept at the start of training).

    Args:
        output_dir: ``cfg.OUTPUT_DIR``.
        resume: the run continues the one in ``output_dir`` (``--resume``): always allowed.
        overwrite: ``--overwrite``: allowed; :func:`train` then deletes the old checkpoints.

    Raises:
        OutputDirInUseError: checkpoints found and neither ``resume`` nor ``overwrite``; the
            message names the folder and the files and offers the three ways out.
    """
    if resume or overwrite:
        return
    found = run_checkpoints(output_dir)
    if found:
        shown = ", ".join(found[:6]) + (f", ... (+{len(found) - 6} more)" if len(found) > 6 else "")
        raise OutputDirInUseError(
            f"OUTPUT_DIR {output_dir} holds checkpoints of another run ({shown}); a new run would "
            "replace them. Pass --resume to continue that run, choose a new OUTPUT_DIR "
            f"(e.g. OUTPUT_DIR {output_dir.rstrip(os.sep)}_2), or pass --overwrite to delete them and start over."
        )


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differing_keys(old_yaml: str, new_yaml: str) -> List[str]:
    import yaml

    try:
        a, b = _flatten(yaml.safe_load(old_yaml)), _flatten(yaml.safe_load(new_yaml))
    except yaml.YAMLError:
        return ["(the earlier config.yaml is not valid YAML)"]
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _write_config(output_dir: str, text: str, replace: bool = False) -> str:
    """Write ``text`` to ``output_dir/config.yaml`` unless an earlier, different one is there: that
    one is kept and ``text`` goes to ``config.<YYYYmmdd-HHMMSS>.yaml`` beside it (a warning names
    both and the differing keys). ``replace`` (``--overwrite``) replaces it. Returns the path written
    (or the existing identical ``config.yaml``)."""
    path = os.path.join(output_dir, "config.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return path
        if not replace:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            new_path, n = os.path.join(output_dir, f"config.{stamp}.yaml"), 1
            while os.path.exists(new_path):
                new_path, n = os.path.join(output_dir, f"config.{stamp}-{n}.yaml"), n + 1
            keys = _differing_keys(old, text)
            logger.warning("%s of an earlier run differs from this run's config (%s); it is kept, and this "
                           "run's config is written to %s", path, ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""),
                           new_path)
            path = new_path
        else:
            logger.info("--overwrite: replacing %s", path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def seed_from_cfg(cfg) -> int:
    """Seed Python, NumPy and torch (``lightning.seed_everything``, data-loader workers included)
    with ``SEED``, or a seed drawn at random when it is negative. Returns the seed."""
    seed = cfg.SEED if cfg.SEED >= 0 else random.SystemRandom().randrange(2**31)
    L.seed_everything(seed, workers=True, verbose=False)
    return seed


def default_setup(cfg, args=None) -> int:
    """Check OUTPUT_DIR, create it, set up logging, write the config, seed everything. Returns the seed.

    When ``args`` are training arguments (they have ``resume`` and no ``eval_only``), a new run
    into a folder holding another run's checkpoints is refused before anything is written
    (:func:`check_output_dir`; ``args.overwrite`` allows it). The config goes to
    ``OUTPUT_DIR/config.yaml``; an earlier, different ``config.yaml`` is kept and this run's is
    written beside it as ``config.<YYYYmmdd-HHMMSS>.yaml`` (replaced only with ``--overwrite``).

    Raises:
        OutputDirInUseError: see :func:`check_output_dir`.
    """
    rank = _env_rank()
    training = args is not None and hasattr(args, "resume") and not getattr(args, "eval_only", False)
    overwrite = bool(getattr(args, "overwrite", False)) and training
    if rank == 0 and training:
        check_output_dir(cfg.OUTPUT_DIR, resume=bool(args.resume), overwrite=overwrite)
    setup_logging(cfg.OUTPUT_DIR, rank)
    seed = seed_from_cfg(cfg)
    if rank == 0:
        _write_config(cfg.OUTPUT_DIR, cfg.dump(), replace=overwrite)
        if args is not None:
            logger.info("Command line arguments: %s", vars(args))
        logger.info("Using seed %d%s", seed, "" if cfg.SEED >= 0 else " (drawn at random; set SEED to fix it)")
    if cfg.CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True
    return seed


@contextlib.contextmanager
def fatal_errors_logged(output_dir: str):
    """Context manager: an exception escaping the block (also ``KeyboardInterrupt``; not
    ``SystemExit(0)``, nor :class:`OutputDirInUseError`, which must not write into that folder) is
    written with its traceback to the log files of ``output_dir`` that are open in the
    ``instseg`` logger (``log.txt``, ``log.rank<N>.txt``), then re-raised unchanged (so stderr
    shows it as usual). Nothing is written when no such log file is open yet."""
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)) and not isinstance(e, OutputDirInUseError):
            folder = os.path.abspath(output_dir)
            root = logging.getLogger("instseg")
            handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)
                        and os.path.dirname(h.baseFilename) == folder]
            if handlers:
                record = root.makeRecord(root.name, logging.ERROR, __file__, 0, "Fatal error, the run stops: %s: %s",
                                         (type(e).__name__, e), sys.exc_info())
                for h in handlers:
                    h.handle(record)
                    h.flush()
        raise


def last_checkpoint(output_dir: str) -> Optional[str]:
    """``OUTPUT_DIR/last.ckpt`` if it exists (following the link), else None."""
    path = os.path.join(output_dir, "last.ckpt")
    return path if os.path.isfile(path) else None


def _probe_checkpoint(path: str) -> Tuple[Optional[int], Optional[str]]:
    """``(global_step, None)`` when ``path`` opens as a training checkpoint, else ``(None, why)``.
    Uses ``torch.load(mmap=True)``: the zip index and pickled state are read, tensors mapped, so
    an intact file is checked without reading all of it; when that fails, a plain ``torch.load``
    gives the reason (for a truncated file: no zip central directory)."""
    if os.path.islink(path) and not os.path.exists(path):
        return None, f"a link to the missing file {os.readlink(path)}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - mmap's errors say little ("Invalid argument"): ask the plain reader
        try:  # fails fast on a truncated file (the zip index is at its end)
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure means: not loadable
            first = str(e).splitlines()[0] if str(e) else ""
            return None, f"truncated or corrupt, {os.path.getsize(path)} bytes: {type(e).__name__}: {first}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return None, "not a training checkpoint (no state_dict / global_step)"
    return int(ckpt["global_step"]), None


def find_resume_checkpoint(output_dir: str) -> Optional[Tuple[str, int]]:
    """The checkpoint ``--resume`` continues from: ``last.ckpt`` when it loads; else (with a
    warning naming it and why) the newest checkpoint by iteration among ``model_XXXXXXX.ckpt`` and
    ``model_final.ckpt`` that loads (damaged ones are named too).

    Returns:
        ``(path, iteration)``, or ``None`` when ``output_dir`` holds no checkpoint.

    Raises:
        ResumeError: there are checkpoints but none loads (each is named with its error).
    """
    last = os.path.join(output_dir, "last.ckpt")
    failures = []
    if os.path.lexists(last):
        step, why = _probe_checkpoint(last)
        if why is None:
            return last, step
        failures.append((last, why))
        logger.warning("--resume: %s is damaged (%s); falling back to the newest periodic checkpoint that loads", last, why)
    others = [p for _, p in periodic_checkpoints(output_dir)]
    final = os.path.join(output_dir, "model_final.ckpt")
    if os.path.lexists(final):
        others.append(final)
    seen = {os.path.realpath(p) for p, _ in failures}
    best = None
    for path in reversed(others):
        if os.path.realpath(path) in seen:
            continue
        step, why = _probe_checkpoint(path)
        if why is not None:
            failures.append((path, why))
            logger.warning("--resume: %s is damaged (%s); skipped", path, why)
        elif best is None or step > best[1]:
            best = (path, step)
    if best is not None:
        if failures:
            logger.warning("--resume: using %s (iteration %d) instead", best[0], best[1])
        return best
    if failures:
        raise ResumeError(
            f"--resume: no checkpoint in {output_dir} can be loaded: "
            + "; ".join(f"{p}: {why}" for p, why in failures)
            + ". Remove the damaged files to start from MODEL.WEIGHTS, or use a new OUTPUT_DIR without --resume."
        )
    return None


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


def _precision(cfg, device: str = "") -> str:
    """Lightning ``precision`` for ``SOLVER.AMP``: ``"32-true"``, ``"16-mixed"`` or ``"bf16-mixed"``.

    fp16 AMP on a CPU (``device``, default ``MODEL.DEVICE`` or, when empty, ``cuda`` if available) runs in float32, with a warning: Detectron2's
    AMPTrainer uses ``torch.cuda.amp.autocast``, which does nothing without CUDA, so the official
    configs (FastInst's ``AMP.ENABLED True``) train in float32 there; float16 autocast on a CPU is
    also ~10x slower (measured: FastInst-D3 R-50, batch 2 at 128 px, 17 s/iter against 1.5 s).
    bf16 is kept on any device. Raises ``ValueError`` for another ``SOLVER.AMP.PRECISION``.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    p = cfg.SOLVER.AMP.PRECISION.lower()
    if p not in ("fp16", "bf16"):
        raise ValueError(f"SOLVER.AMP.PRECISION must be fp16 or bf16, got '{cfg.SOLVER.AMP.PRECISION}'")
    device = device or cfg.MODEL.DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    if p == "fp16" and str(device).startswith("cpu"):
        logger.warning("SOLVER.AMP.ENABLED with fp16 on MODEL.DEVICE cpu: training in float32 (as Detectron2's "
                       "AMPTrainer, whose CUDA autocast is off without a GPU); SOLVER.AMP.PRECISION bf16 for CPU AMP")
        return "32-true"
    return "16-mixed" if p == "fp16" else "bf16-mixed"


def build_trainer(cfg, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "", extra_callbacks=()) -> L.Trainer:
    """A Lightning Trainer configured from ``cfg`` (see module docstring).

    ``num_gpus`` is the number of processes per machine: GPUs on CUDA, gloo processes on CPU
    (``MODEL.DEVICE cpu``). ``dist_url`` ``tcp://HOST:PORT`` sets the rendezvous for
    multi-machine runs. Checkpoints: :class:`HousekeepingCheckpoint` (``model_XXXXXXX.ckpt`` every
    ``SOLVER.CHECKPOINT_PERIOD``, the newest ``SOLVER.CHECKPOINT_KEEP_LAST`` kept, ``last.ckpt`` a
    link) written by :class:`AtomicCheckpointIO`.
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
    ckpt = HousekeepingCheckpoint(cfg.OUTPUT_DIR, period if period > 0 else None, keep_last=int(cfg.SOLVER.CHECKPOINT_KEEP_LAST))
    eval_period = int(cfg.TEST.EVAL_PERIOD)
    has_test = len(cfg.DATASETS.TEST) > 0
    callbacks = [ckpt, RNGStateCallback(), IterationProgressBar(refresh_rate=1 if sys.stdout.isatty() else max(1, int(cfg.LOG_PERIOD))),
                 _LossLogger(cfg.LOG_PERIOD), DDPConsistencyRecord(cfg.OUTPUT_DIR)] + list(extra_callbacks)
    return L.Trainer(
        accelerator=accelerator,
        devices=num_gpus if accelerator == "gpu" or world > 1 else 1,
        num_nodes=num_machines,
        strategy=strategy,
        precision=_precision(cfg, device),
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


def _load_initial_weights(module: InstSegModule, weights: str, strict: bool = False) -> None:
    """Load ``weights`` (MODEL.WEIGHTS) into ``module.model``; log what did not fit.

    ``strict`` (evaluation): anything missing, unexpected or of another shape raises
    :class:`instseg.checkpoint.IncompleteWeightsError` (the full lists go to the log first).
    Otherwise (fine-tuning) the same lists are logged as a warning and training goes on.
    """
    if not weights:
        return
    from ..checkpoint import check_complete_load, describe_load_report, is_complete_load, load_checkpoint

    report = load_checkpoint(module.model, weights)
    if is_complete_load(report):
        logger.info("Loaded %s: all %d model tensors", weights, len(report.get("loaded", [])))
        return
    cfg = module.cfg
    what = f"the model of this config ({cfg.MODEL.META_ARCHITECTURE}, MODEL.NUM_CLASSES {cfg.MODEL.NUM_CLASSES})"
    if strict:
        logger.error("Weights that do not fit %s, in full:\n%s", what, describe_load_report(report, weights, limit=0))
        check_complete_load(report, weights, what)
    logger.warning("Fine-tuning from weights that do not fill %s (the rest keeps its initialization):\n%s",
                   what, describe_load_report(report, weights, limit=0))


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


def train(cfg, resume: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "",
          overwrite: bool = False) -> Dict:
    """Train ``cfg`` to ``SOLVER.MAX_ITER``; returns the final evaluation of every dataset of
    ``DATASETS.TEST``, ``{dataset_name: {"segm": {"AP", "AP50", ...}, "bbox": {...}}}`` (``{}``
    without a test set, and on ranks other than 0).

    With ``resume``, continues from the checkpoint of :func:`find_resume_checkpoint` (``last.ckpt``,
    or the newest one that loads when it is damaged) at its iteration, with optimizer, scheduler
    and RNG state; when there is none it says so and starts from MODEL.WEIGHTS (tolerant loading:
    what does not fit is listed in the log). Without ``resume``, an OUTPUT_DIR holding another
    run's checkpoints is refused (:func:`check_output_dir`) unless ``overwrite``, which deletes
    them first (rank 0). At the end, rank 0 plots the run's CSV losses to
    ``OUTPUT_DIR/loss_curve.png`` (:func:`write_loss_curve`; a failure there is only a warning).

    Raises:
        OutputDirInUseError: see :func:`check_output_dir`.
        ResumeError: ``resume`` and no checkpoint in OUTPUT_DIR loads.
        instseg.engine.callbacks.CheckpointWriteError: a checkpoint could not be written (path named).
    """
    _check_dataset_files(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if _env_rank() == 0 and not resume:
        check_output_dir(cfg.OUTPUT_DIR, overwrite=overwrite)
        if overwrite:
            old = run_checkpoints(cfg.OUTPUT_DIR) + [n for n in (os.listdir(cfg.OUTPUT_DIR) if os.path.isdir(cfg.OUTPUT_DIR) else [])
                                                     if n.startswith(TMP_PREFIX) and n.endswith(".ckpt")]
            for name in old:
                os.remove(os.path.join(cfg.OUTPUT_DIR, name))
            if old:
                logger.warning("--overwrite: removed %d checkpoint file(s) of the earlier run in %s: %s", len(old), cfg.OUTPUT_DIR, old)
    module = InstSegModule(cfg)
    data = InstSegDataModule(cfg)
    found = find_resume_checkpoint(cfg.OUTPUT_DIR) if resume else None
    ckpt_path = found[0] if found else None
    if resume and ckpt_path is None:
        logger.warning("--resume: no checkpoint in %s; starting from iteration 0 (MODEL.WEIGHTS=%r)", cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS)
    if ckpt_path is None:
        _load_initial_weights(module, cfg.MODEL.WEIGHTS, strict=False)
    else:
        logger.info("Resuming from %s at iteration %d", ckpt_path, found[1])
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
    if trainer.global_rank == 0:
        write_loss_curve(cfg.OUTPUT_DIR)
    return results


def write_loss_curve(output_dir: str) -> Optional[str]:
    """Plot ``OUTPUT_DIR/csv/version_*/metrics.csv`` to ``OUTPUT_DIR/loss_curve.png``
    (:func:`instseg.utils.visualize.plot_loss_curve`); the end of every :func:`train` (rank 0).

    Never raises: a failure (no CSV, no matplotlib, ...) is logged as a warning and ``None``
    returned, so a finished training run is never turned into a failed one. Returns the PNG path.
    """
    out = os.path.join(output_dir, "loss_curve.png")
    try:
        from ..utils.visualize import plot_loss_curve

        plot_loss_curve(os.path.join(output_dir, "csv"), out)
    except Exception as e:  # noqa: BLE001 - a picture must not fail a finished run
        logger.warning("Loss curve not written to %s: %s: %s", out, type(e).__name__, e)
        return None
    logger.info("Loss curve written to %s", out)
    return out


def evaluate(cfg, num_gpus: int = 1, per_category: bool = False, allow_partial_weights: bool = False,
             channels_last: bool = False) -> Dict:
    """COCO evaluation of ``MODEL.WEIGHTS`` on every dataset of ``DATASETS.TEST``.

    ``channels_last``: the model runs in ``torch.channels_last`` memory format (the same numbers
    up to float summation order). ``SOLVER.AMP`` sets the autocast of the evaluation as of training.

    The weights must fill the model: a missing, unexpected or shape-mismatched tensor (another
    model family, another class count, an ImageNet backbone file) is an error unless
    ``allow_partial_weights`` (then the lists are logged and the partly initialized model is
    evaluated). An empty MODEL.WEIGHTS evaluates the model as initialized (the tools refuse it).

    Raises:
        instseg.checkpoint.IncompleteWeightsError: the weights do not fill the model (lists in the message).
        ValueError: DATASETS.TEST is empty.

    Returns:
        ``{dataset_name: {"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"[, "AP-<category>"
        ...]}, "bbox": {...}}}`` on rank 0 (``{}`` on other ranks); files as in the module
        docstring.
    """
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: nothing to evaluate")
    _check_dataset_files(list(cfg.DATASETS.TEST))
    module = InstSegModule(cfg, per_category=per_category)
    _load_initial_weights(module, cfg.MODEL.WEIGHTS, strict=not allow_partial_weights)
    if channels_last:
        module.model.to(memory_format=torch.channels_last)
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
