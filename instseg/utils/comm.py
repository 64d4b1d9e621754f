"""Distributed helpers that also work in a single, non-distributed process.

Every function here is safe to call when :mod:`torch.distributed` is unavailable or not
initialized: the process then behaves as rank 0 of a world of size 1. Under DDP (e.g. Lightning's
strategy, which initializes the default process group), they act on the default group.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "is_dist_avail_and_initialized",
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "is_main_process",
    "synchronize",
    "all_gather",
    "gather",
]

logger = logging.getLogger(__name__)


def is_dist_avail_and_initialized() -> bool:
    """True when ``torch.distributed`` is built in and its default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_local_rank() -> int:
    """Rank within this machine, from the ``LOCAL_RANK`` environment variable (0 if unset)."""
    import os

    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on global rank 0 (and always when not distributed)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op when not distributed or with a single process."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@functools.lru_cache()
def _get_cpu_group() -> Optional["dist.ProcessGroup"]:
    """A gloo group over all ranks so that gathered Python objects stay in host memory.

    With NCCL, ``all_gather_object`` would serialize through GPU memory; Detectron2 gathers
    through a gloo group for this reason. ``None`` (= default group) if gloo cannot be created.
    Must be first called by every rank (it is, from :func:`all_gather` / :func:`gather`).
    """
    if dist.get_backend() == "gloo":
        return None
    try:
        return dist.new_group(backend="gloo")
    except Exception as e:  # pragma: no cover - depends on the build
        logger.warning("Could not create a gloo group (%s); gathering through the default group", e)
        return None


def all_gather(data: Any, group: Optional["dist.ProcessGroup"] = None) -> List[Any]:
    """Gather a picklable object from every rank; every rank receives the list.

    Args:
        data: any picklable object.
        group: process group; default: a gloo group over all ranks.

    Returns:
        ``[data_rank0, data_rank1, ...]`` (``[data]`` when not distributed).
    """
    if get_world_size() == 1:
        return [data]
    if group is None:
        group = _get_cpu_group()
    world = dist.get_world_size(group=group)
    output: List[Any] = [None] * world
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group: Optional["dist.ProcessGroup"] = None) -> List[Any]:
    """Gather a picklable object from every rank onto global rank ``dst``.

    Returns:
        On rank ``dst``: ``[data_rank0, data_rank1, ...]``; on the other ranks: ``[]``.
        ``[data]`` when not distributed.
    """
    if get_world_size() == 1:
        return [data]
    if group is None:
        group = _get_cpu_group()
    world = dist.get_world_size(group=group)
    if dist.get_rank() == dst:
        output: List[Any] = [None] * world
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def gather_lists_to_main(items: List[Any]) -> Optional[List[Any]]:
    """Concatenate every rank's list ``items`` (rank order) on the main process.

    For evaluators that collect per-image predictions: synchronizes, gathers onto rank 0 and
    flattens. Returns the concatenated list on rank 0 (``items`` itself when not distributed) and
    ``None`` on the other ranks.
    """
    if get_world_size() == 1:
        return items
    synchronize()
    gathered = gather(items, dst=0)
    if not is_main_process():
        return None
    return [x for part in gathered for x in part]
