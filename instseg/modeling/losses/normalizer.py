"""Loss normalization shared by the set-prediction criteria (DETR convention)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist

__all__ = ["num_instances_across_ranks"]


def num_instances_across_ranks(targets: Sequence[Dict[str, torch.Tensor]], device) -> float:
    """Average number of ground-truth instances per rank, at least 1.

    The count of ``targets[i]["labels"]`` is all-reduced over DDP ranks and divided by the world
    size, so every rank normalizes its summed losses by the same number (official SparseInst /
    FastInst / Sparse R-CNN criteria). Returns a Python float.
    """
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return max(n.item() / world, 1.0)
