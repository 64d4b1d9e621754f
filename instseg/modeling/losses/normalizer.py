"""Loss normalization shared by the set-prediction criteria (DETR convention)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["num_instances_across_ranks"]


def num_instances_across_ranks(
    targets: Sequence[Dict[str, torch.Tensor]], device, max_per_image: Optional[int] = None
) -> float:
    """Average number of ground-truth instances per rank, at least 1.

    The count of ``targets[i]["labels"]`` is all-reduced over DDP ranks and divided by the world
    size, so every rank normalizes its summed losses by the same number (official SparseInst /
    FastInst / Sparse R-CNN criteria). Returns a Python float.

    ``max_per_image`` caps each image's count: with N predictions, a one-to-one (Hungarian)
    assignment matches ``min(N, #GT)`` of them, and criteria normalized by the number of matched
    predictions (mmdetection's ``avg_factor`` of QueryInst) pass ``N`` here.
    """
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
    counts = [len(t["labels"]) for t in targets]
    if max_per_image is not None:
        counts = [min(c, max_per_image) for c in counts]
    n = torch.tensor([float(sum(counts))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return max(n.item() / world, 1.0)
