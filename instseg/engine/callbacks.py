"""Lightning extensions: atomic checkpoint writes, RNG state in checkpoints, an ETA progress bar
for iteration-based training, and a DDP parameter-consistency record."""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

__all__ = ["AtomicCheckpointIO", "RNGStateCallback", "IterationProgressBar", "DDPConsistencyRecord"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, fsyncs it and renames it over
    the target (``os.replace`` is atomic on POSIX), so a crash mid-write leaves the previous
    checkpoint intact."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


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
