"""Samplers of the data loaders.

- :class:`TrainingSampler`: infinite shuffled index stream, one shard per rank;
- :class:`InfiniteBatchSampler` / :class:`GroupedBatchSampler`: batches of that stream (grouped by
  aspect ratio), resumable at an iteration;
- :class:`InferenceSampler`: every test index exactly once over all ranks;
- ``_PositionSeededBatchSampler``: tags each index with a seed of its position in the stream
  (augmentations reproducible across resumes, see :class:`instseg.data.dataset.MapDataset`).
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["TrainingSampler", "InferenceSampler", "GroupedBatchSampler", "InfiniteBatchSampler"]


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices, sharded by rank.

    All ranks generate the same global stream (``torch.randperm(size)`` epochs from a generator
    seeded with ``seed``, or ``0..size-1`` repeated when ``shuffle=False``); rank ``r`` takes
    ``stream[r::world_size]``. Shards are therefore disjoint within each pass over the data.

    Args:
        size: number of images (> 0).
        shuffle: shuffle each epoch.
        seed: seed of the permutations; must be the same on all ranks.
        rank, world_size: this process's shard.

    Raises:
        ValueError: ``size <= 0`` or ``rank`` not in ``[0, world_size)``.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError(f"TrainingSampler: dataset size must be positive, got {size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainingSampler: rank {rank} not in [0, {world_size})")
        self._size, self._shuffle, self._seed = int(size), bool(shuffle), int(seed)
        self._rank, self._world_size = int(rank), int(world_size)

    def _infinite_indices(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)


class InfiniteBatchSampler(Sampler[List[int]]):
    """Consecutive batches of ``batch_size`` indices from an infinite ``sampler``; the first
    ``start_iter`` batches are skipped (the resumed stream is the tail of the full one)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, start_iter: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler, self.batch_size, self.start_iter = sampler, int(batch_size), int(start_iter)

    def _batches(self) -> Iterator[List[int]]:
        it = iter(self.sampler)
        while True:
            batch = list(itertools.islice(it, self.batch_size))
            if len(batch) < self.batch_size:
                return
            yield batch

    def __iter__(self) -> Iterator[List[int]]:
        yield from itertools.islice(self._batches(), self.start_iter, None)


class GroupedBatchSampler(InfiniteBatchSampler):
    """Batches whose images all have the same orientation: group 0 (``width >= height``) or
    group 1 (``height > width``), Detectron2's aspect-ratio grouping done on indices.

    Indices are buffered per group in stream order; a batch is emitted as soon as a group holds
    ``batch_size`` indices. The first ``start_iter`` batches are skipped (indices only, no image
    is loaded), so a resumed run continues the uninterrupted stream exactly.

    Args:
        sampler: infinite index sampler (e.g. :class:`TrainingSampler`).
        group_ids: ``group_ids[i]`` in ``{0, 1}`` for dataset index ``i``.
        batch_size: images per batch (per rank).
        start_iter: batches to skip.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, start_iter: int = 0):
        super().__init__(sampler, batch_size, start_iter)
        self.group_ids = np.asarray(group_ids, dtype=np.int64)

    def _batches(self) -> Iterator[List[int]]:
        buckets: Dict[int, List[int]] = {}
        for idx in self.sampler:
            gid = int(self.group_ids[idx])
            bucket = buckets.setdefault(gid, [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]


class InferenceSampler(Sampler[int]):
    """Indices ``0..size-1`` split into contiguous shards, one per rank, without padding.

    Shard sizes differ by at most one (the first ``size % world_size`` ranks get one more), so
    every index is produced exactly once over all ranks.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if size < 0:
            raise ValueError(f"InferenceSampler: negative size {size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"InferenceSampler: rank {rank} not in [0, {world_size})")
        base, left = divmod(int(size), int(world_size))
        sizes = [base + int(r < left) for r in range(world_size)]
        begin = sum(sizes[:rank])
        self._local = range(begin, begin + sizes[rank])

    def __iter__(self) -> Iterator[int]:
        return iter(self._local)

    def __len__(self) -> int:
        return len(self._local)


class _PositionSeededBatchSampler(Sampler):
    """Tags each index of batch ``it`` with a seed derived from ``(seed, rank, it, slot)``.

    :class:`MapDataset` draws that sample's augmentation from a generator seeded with it, so the
    augmentation depends only on the sample's position in the stream: a run resumed at
    ``start_iter`` draws exactly the augmentations of the uninterrupted run, whatever the number
    of workers and whatever the model consumed from the global generator in between.
    """

    def __init__(self, batch_sampler: Sampler, seed: int, rank: int, start_iter: int):
        self.batch_sampler, self.seed, self.rank, self.start_iter = batch_sampler, int(seed), int(rank), int(start_iter)

    def __iter__(self):
        for it, batch in enumerate(self.batch_sampler, start=self.start_iter):
            base = (self.seed * 1_000_003 + self.rank) * 1_000_033 + it
            yield [((base * 131 + k) % 2**63, idx) for k, idx in enumerate(batch)]
