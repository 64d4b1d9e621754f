"""Lightning extensions: atomic checkpoint writes and checkpoint housekeeping, RNG state in
checkpoints, an ETA progress bar for iteration-based training, and a DDP parameter-consistency
record.

Checkpoint files in ``OUTPUT_DIR`` (docs/robustness.md):

* ``model_XXXXXXX.ckpt`` every ``SOLVER.CHECKPOINT_PERIOD`` iterations (``XXXXXXX``: the
  iteration, 7 digits); ``SOLVER.CHECKPOINT_KEEP_LAST N > 0`` keeps the newest ``N`` of them. A
  step saved again (after a resume) replaces its own file (no ``-v1`` copies).
* ``last.ckpt``: a relative symbolic link to the newest periodic checkpoint, replaced atomically
  (no second full write); a full file only when a run saved no periodic checkpoint.
* ``model_final.ckpt`` at the end of training.
* ``.tmp-*.ckpt``: a write in progress (written, fsynced, then renamed over the target); files
  left by a killed process are removed when the next fit starts.
"""
from __future__ import annotations

import errno as errno_mod
import json
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "HousekeepingCheckpoint",
    "RNGStateCallback",
    "IterationProgressBar",
    "DDPConsistencyRecord",
    "periodic_checkpoints",
    "sweep_temporary_checkpoints",
    "atomic_link",
]

logger = logging.getLogger("instseg")

TMP_PREFIX = ".tmp-"
_PERIODIC = re.compile(r"^model_(\d+)\.ckpt$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only folder, ...). ``filename`` is the
    checkpoint's path, ``errno`` the cause's (``None`` when torch's writer gave none); the file
    previously at that path, if any, is unchanged."""

    def __init__(self, path: str, cause: BaseException):
        folder = os.path.dirname(path) or "."
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder}"
        except OSError:
            free = f"free space of {folder} unknown"
        code = getattr(cause, "errno", None)
        msg = (f"could not write checkpoint {path}: {type(cause).__name__}: {cause} ({free}). "
               "The previous checkpoint at that path, if any, is unchanged and no temporary file "
               "is left; free disk space (or fix the folder's permissions) and continue with --resume.")
        super().__init__(code, msg, path)
        self.message = msg

    def __str__(self) -> str:
        return self.message


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file (``.tmp-*.ckpt``) in the same folder, fsyncs it
    and renames it over the target (``os.replace`` is atomic on POSIX), so a crash mid-write
    leaves the previous checkpoint intact.

    Raises:
        CheckpointWriteError: the folder cannot be created or written, or ``torch.save`` fails
            (``OSError`` such as ENOSPC, or torch's ``RuntimeError`` from its zip writer); the
            message names the checkpoint path and the free space; the temporary file is removed.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".ckpt", dir=folder)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(folder)
        except (OSError, RuntimeError) as e:
            raise CheckpointWriteError(path, e) from e
        finally:  # also on KeyboardInterrupt
            if tmp is not None and os.path.lexists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass


def sweep_temporary_checkpoints(folder: str) -> List[str]:
    """Remove the ``.tmp-*.ckpt`` files (and links) that a killed process left in ``folder``.

    Only call it where no other process is writing checkpoints into ``folder`` (rank 0, before
    training starts).

    Returns:
        The removed paths (``[]`` when ``folder`` does not exist).
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(TMP_PREFIX) and name.endswith(".ckpt") and (os.path.islink(path) or os.path.isfile(path)):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def periodic_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """``[(iteration, path)]`` of the ``model_XXXXXXX.ckpt`` files in ``folder``, oldest first
    (``model_final.ckpt``, ``last.ckpt`` and ``-vN`` copies are not included)."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = _PERIODIC.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def atomic_link(target: str, linkpath: str) -> str:
    """Make ``linkpath`` point to ``target``, replacing what was there atomically: a relative
    symbolic link; where symlinks are not allowed (Windows without the privilege) a hard link;
    else a copy.

    Returns:
        ``"symlink"``, ``"hardlink"`` or ``"copy"``.

    Raises:
        OSError: none of the three could be made (the message names ``linkpath``).
    """
    folder = os.path.dirname(linkpath) or "."
    tmp = os.path.join(folder, f"{TMP_PREFIX}link-{uuid.uuid4().hex}.ckpt")
    kind = "symlink"
    try:
        try:
            os.symlink(os.path.relpath(target, folder), tmp)
        except OSError:
            kind = "hardlink"
            try:
                os.link(target, tmp)
            except OSError:
                kind = "copy"
                shutil.copyfile(target, tmp)
        os.replace(tmp, linkpath)
        tmp = None
    except OSError as e:
        raise OSError(getattr(e, "errno", None) or errno_mod.EIO, f"could not point {linkpath} at {target}: {e}") from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
    return kind


class HousekeepingCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for ``OUTPUT_DIR/model_XXXXXXX.ckpt`` with the housekeeping
    of the module docstring: ``save_last="link"`` (``last.ckpt`` replaced atomically by
    :func:`atomic_link` instead of Lightning's remove-then-symlink), no version counter (a redone
    step replaces its own file), the newest ``keep_last`` periodic checkpoints kept (``0``: all;
    ``last.ckpt``'s target and ``model_final.ckpt`` are never removed) and ``.tmp-*.ckpt`` files
    swept when a fit starts (rank 0).

    Built on two private hooks of Lightning 2.6's ``ModelCheckpoint`` (``_link_checkpoint``,
    ``_save_last_checkpoint``); tests/test_robust_engine.py fails if a Lightning update changes them.

    Args:
        dirpath: the folder (``OUTPUT_DIR``).
        every_n_train_steps: the period in iterations (``None``: no periodic checkpoint).
        keep_last: ``SOLVER.CHECKPOINT_KEEP_LAST``.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int], keep_last: int = 0):
        if int(keep_last) < 0:
            raise ValueError(f"SOLVER.CHECKPOINT_KEEP_LAST must be >= 0 (0 keeps all), got {keep_last}")
        super().__init__(
            dirpath=dirpath,
            filename="model_{step:07d}",
            every_n_train_steps=every_n_train_steps,
            save_top_k=-1,
            save_last="link",
            save_on_train_epoch_end=False,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self.keep_last = int(keep_last)

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # log.txt / config.yaml are there; other runs' checkpoints were refused
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            removed = sweep_temporary_checkpoints(str(self.dirpath))
            if removed:
                logger.info("Removed %d temporary checkpoint file(s) left by an interrupted write: %s",
                            len(removed), [os.path.basename(p) for p in removed])

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_link(filepath, linkpath)
        trainer.strategy.barrier()

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._prune(trainer)

    def _prune(self, trainer) -> None:
        if self.keep_last <= 0 or not trainer.is_global_zero:
            return
        periodic = periodic_checkpoints(str(self.dirpath))
        last = os.path.join(str(self.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        protected = os.path.realpath(last) if os.path.lexists(last) else None
        for _, path in periodic[: max(len(periodic) - self.keep_last, 0)]:
            if os.path.realpath(path) == protected:
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def _np_state_to_safe(st):
    # a plain dict of str/int/float/tensor, loadable by torch.load(weights_only=True)
    key, keys, pos, has_gauss, cached = st
    return {"key": key, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_safe(d):
    return (d["key"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


class RNGStateCallback(Callback):
    """Saves and restores Python, NumPy and torch (CPU and CUDA) RNG states with the checkpoint, so
    that a resumed run draws the same augmentations as an uninterrupted one."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["rng_state"] = {
            "python": random.getstate(),
            "numpy": _np_state_to_safe(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint.get("rng_state")
        if not state:
            return
        random.setstate(state["python"])
        np.random.set_state(_np_state_from_safe(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])


class IterationProgressBar(TQDMProgressBar):
    """TQDM bar whose total is ``max_steps`` (the training loader is infinite), so it shows an ETA."""

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else super().total_train_batches

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=self.total_train_batches)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("iter")

    def on_train_epoch_start(self, trainer, *args):
        # an "epoch" is the whole infinite stream: keep counting iterations, not batches per epoch
        if self.train_progress_bar.total != self.total_train_batches:
            self.train_progress_bar.reset(total=self.total_train_batches)
        self.train_progress_bar.n = trainer.global_step


class DDPConsistencyRecord(Callback):
    """At the end of training every rank computes a checksum of its parameters; rank 0 writes all
    of them to ``OUTPUT_DIR/ddp_param_checksums.json`` (used to check that DDP keeps the ranks'
    parameters identical)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            vec = torch.cat([p.detach().double().flatten() for p in pl_module.parameters()])
            local = {"sum": float(vec.sum()), "abs_sum": float(vec.abs().sum()), "first": vec[:8].tolist()}
        gathered = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
        if trainer.global_rank == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "ddp_param_checksums.json"), "w") as f:
                json.dump({"world_size": len(gathered), "ranks": gathered}, f)
