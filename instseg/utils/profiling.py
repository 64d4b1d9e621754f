"""Named timing regions for ``instseg-train --profile`` (:func:`instseg.engine.profile_training`).

A model marks a part of its training forward that the profile should report on its own (the
matching of predictions to ground truth, in every criterion) with ``with region("matching"):``.
Outside :func:`collect_regions` the region costs one global lookup: nothing is timed.

Times are wall-clock seconds (``time.perf_counter``); on a CUDA device the region synchronizes
before and after, so that the time is the region's and not a queue's.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, Optional

import torch

__all__ = ["region", "collect_regions"]

_active: Optional[Dict[str, float]] = None


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``name`` in the innermost :func:`collect_regions`
    (a no-op when none is active). Nested regions of the same name count once per entry."""
    acc = _active
    if acc is None:
        yield
        return
    sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize()
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def collect_regions() -> Iterator[Dict[str, float]]:
    """Collect :func:`region` times inside the ``with`` body into the yielded dict (name -> seconds)."""
    global _active
    previous, _active = _active, {}
    try:
        yield _active
    finally:
        _active = previous
