"""Training and test data loaders, samplers, and ``MODEL.NUM_CLASSES`` resolution.

- Training: :func:`build_train_loader` -- the datasets of ``DATASETS.TRAIN`` concatenated,
  empty images filtered, an infinite shuffled index stream (:class:`TrainingSampler`, one shard per
  rank), batches grouped by aspect ratio, resumable at an iteration (``start_iter``).
- Test: :func:`build_test_loader` -- one dataset, every image exactly once across ranks
  (:class:`InferenceSampler`), mapper in test mode.

Both yield lists of mapped dicts (see :class:`instseg.data.mapper.DatasetMapper`). The training
loader is infinite and has no ``len()``: run it for ``SOLVER.MAX_ITER`` iterations (with
Lightning, ``use_distributed_sampler=False`` because the sampler already shards by rank).
"""
from __future__ import annotations

import itertools
import logging
import pickle
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .catalog import DatasetCatalog, MetadataCatalog
from .mapper import DatasetMapper

__all__ = [
    "TrainingSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "InfiniteBatchSampler",
    "MapDataset",
    "get_dataset_dicts",
    "build_train_loader",
    "build_test_loader",
    "resolve_num_classes",
    "trivial_batch_collator",
    "DEFAULT_SAMPLER_SEED",
]

logger = logging.getLogger(__name__)

# Seed of the training index stream when cfg.SEED < 0 and no seed is passed: every rank must use
# the same permutation, so a per-process random seed would break the sharding.
DEFAULT_SAMPLER_SEED = 0


# --------------------------------------------------------------------------------------------- #
# Samplers
# --------------------------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------------------------- #
class _SerializedList:
    """List of dicts stored as one pickled numpy byte buffer (Detectron2's trick): forked
    DataLoader workers share it without copy-on-access growth from Python refcounts."""

    def __init__(self, items: List[Any]):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, i: int) -> Any:
        start = 0 if i == 0 else int(self._addr[i - 1])
        end = int(self._addr[i])
        return pickle.loads(memoryview(self._data[start:end]))


class MapDataset(Dataset):
    """Map-style dataset: ``dataset[i] = mapper(dataset_dicts[i])`` (a fresh copy of the dict)."""

    def __init__(self, dataset_dicts: List[dict], mapper: Callable[[dict], Any], serialize: bool = True):
        self._dicts = _SerializedList(dataset_dicts) if serialize else list(dataset_dicts)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, i) -> Any:
        if isinstance(i, tuple):  # (seed, index) from _PositionSeededBatchSampler
            seed, i = i
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._mapper(self._dicts[i])
        return self._mapper(self._dicts[i])


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


def _has_instances(d: dict) -> bool:
    return any(not a.get("iscrowd", 0) for a in d.get("annotations", []))


def get_dataset_dicts(names: Sequence[str], filter_empty: bool = True) -> List[dict]:
    """Dataset dicts of ``names`` concatenated (in order).

    Args:
        names: registered dataset names.
        filter_empty: drop images without any non-crowd annotation (logged with counts).

    Raises:
        KeyError: a name is not registered.
        ValueError: ``names`` is empty, or a dataset is empty (after filtering): the message names it.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("No dataset given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    out: List[dict] = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ValueError(f"Dataset {name!r} is empty")
        if filter_empty:
            n = len(dicts)
            dicts = [d for d in dicts if _has_instances(d)]
            if len(dicts) < n:
                logger.info("Dataset %r: removed %d of %d images without instances", name, n - len(dicts), n)
            if not dicts:
                raise ValueError(
                    f"Dataset {name!r} has no image with a (non-crowd) instance after filtering "
                    "empty images (DATALOADER.FILTER_EMPTY_ANNOTATIONS)"
                )
        out.extend(dicts)
    return out


def trivial_batch_collator(batch: List[Any]) -> List[Any]:
    """Collate function that returns the batch as the list of mapped dicts."""
    return batch


def _worker_init_fn(worker_id: int) -> None:
    # torch seeds each worker (base_seed + worker_id); seed numpy/random from it as well.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(
    cfg,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    mapper: Optional[Callable[[dict], Any]] = None,
    seed: Optional[int] = None,
) -> DataLoader:
    """Infinite training loader over ``DATASETS.TRAIN`` (concatenated).

    Args:
        cfg: config (``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.*``, ``INPUT.*``,
            ``SEED``).
        rank, world_size: this process's shard of the index stream.
        start_iter: number of iterations already done (resume): the loader continues the
            uninterrupted index stream from batch ``start_iter``.
        mapper: replaces ``DatasetMapper(cfg, is_train=True)``.
        seed: seed of the index stream (same on all ranks); default ``cfg.SEED``, or
            :data:`DEFAULT_SAMPLER_SEED` when ``cfg.SEED < 0``.

    Returns:
        A ``DataLoader`` yielding lists of ``SOLVER.IMS_PER_BATCH // world_size`` mapped dicts,
        forever (no ``len()``). Images without non-crowd instances are filtered when
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; with ``DATALOADER.ASPECT_RATIO_GROUPING`` every
        batch has only ``w >= h`` or only ``h > w`` images (original sizes). The index stream is
        deterministic given the seed; augmentations draw from torch's generator, seeded per
        worker from ``(seed, rank, start_iter)``.

    Raises:
        ValueError: no training dataset, a dataset empty after filtering (named), or
            ``IMS_PER_BATCH`` not a positive multiple of ``world_size``.
    """
    names = list(cfg.DATASETS.TRAIN)
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    batch_size = total // world_size
    _check_same_classes(names)
    dicts = get_dataset_dicts(names, filter_empty=bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
    if seed is None:
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else DEFAULT_SAMPLER_SEED
    sampler = TrainingSampler(len(dicts), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        group_ids = [0 if d["width"] >= d["height"] else 1 for d in dicts]
        batch_sampler: Sampler = GroupedBatchSampler(sampler, group_ids, batch_size, start_iter)
    else:
        batch_sampler = InfiniteBatchSampler(sampler, batch_size, start_iter)
    batch_sampler = _PositionSeededBatchSampler(batch_sampler, seed, rank, start_iter)
    dataset = MapDataset(dicts, mapper if mapper is not None else DatasetMapper(cfg, is_train=True))
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(rank) * 10_007 + int(start_iter)) % 2**63)
    num_workers = int(cfg.DATALOADER.NUM_WORKERS)
    logger.info(
        "Training loader: %d images from %s, %d per batch on rank %d/%d, start_iter %d",
        len(dicts), names, batch_size, rank, world_size, start_iter,
    )
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=_worker_init_fn,
        generator=g,
        persistent_workers=False,
    )


def build_test_loader(
    cfg,
    dataset_name: str,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    mapper: Optional[Callable[[dict], Any]] = None,
) -> DataLoader:
    """Finite test loader over ``dataset_name``: each image once over all ranks, in order.

    Args:
        cfg: config (``INPUT.MIN_SIZE_TEST``, ``MAX_SIZE_TEST``, ``DATALOADER.NUM_WORKERS``).
        dataset_name: a registered dataset (images without instances are kept).
        rank, world_size: this process's contiguous shard (:class:`InferenceSampler`).
        batch_size: images per batch (the last batch may be smaller).
        mapper: replaces ``DatasetMapper(cfg, is_train=False)``.

    Returns:
        A ``DataLoader`` (with ``len()``) yielding lists of mapped dicts without ``"instances"``.

    Raises:
        KeyError: ``dataset_name`` is not registered.
        ValueError: the dataset is empty (named), or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dicts = get_dataset_dicts([dataset_name], filter_empty=False)
    sampler = InferenceSampler(len(dicts), rank=rank, world_size=world_size)
    dataset = MapDataset(dicts, mapper if mapper is not None else DatasetMapper(cfg, is_train=False))
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=trivial_batch_collator,
        worker_init_fn=_worker_init_fn,
    )


# --------------------------------------------------------------------------------------------- #
# Number of classes
# --------------------------------------------------------------------------------------------- #
def _num_classes_of(name: str) -> int:
    if name not in DatasetCatalog:
        raise KeyError(
            f"Dataset {name!r} is not registered. Registered datasets: {', '.join(DatasetCatalog.list())}"
        )
    meta = MetadataCatalog.get(name)
    if not meta.has("thing_classes"):
        DatasetCatalog.get(name)  # a COCO loader sets the metadata
    classes = meta.get("thing_classes")
    if classes is None:
        raise ValueError(
            f"Dataset {name!r} has no 'thing_classes' in its metadata: cannot infer the number of "
            "classes; set MODEL.NUM_CLASSES"
        )
    return len(classes)


def _check_same_classes(names: Sequence[str]) -> None:
    """All datasets must have the same number of classes (different names only warn)."""
    if len(names) < 2:
        return
    counts = {n: _num_classes_of(n) for n in names}
    if len(set(counts.values())) > 1:
        raise ValueError(
            "The training datasets have different numbers of classes: "
            + ", ".join(f"{n!r}: {c}" for n, c in counts.items())
        )
    first = MetadataCatalog.get(names[0]).thing_classes
    for n in names[1:]:
        if MetadataCatalog.get(n).thing_classes != first:
            logger.warning("Datasets %r and %r have different class names", names[0], n)


def resolve_num_classes(cfg) -> int:
    """Check or fill ``MODEL.NUM_CLASSES`` from the datasets' ``thing_classes``.

    The reference dataset is the first of ``DATASETS.TRAIN`` (else of ``DATASETS.TEST``); all
    training datasets must have the same number of classes. ``MODEL.NUM_CLASSES == -1`` is set
    to that number (a frozen cfg is defrosted and frozen again).

    Returns:
        The number of classes.

    Raises:
        ValueError: ``MODEL.NUM_CLASSES`` differs from the dataset's number (the message names
            both numbers and the dataset); the training datasets disagree, or a test dataset
            whose classes are known has another number; no dataset is given and
            ``MODEL.NUM_CLASSES`` is -1; a dataset has no ``thing_classes``.
        KeyError: a dataset is not registered.
    """
    n_cfg = int(cfg.MODEL.NUM_CLASSES)
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        if n_cfg <= 0:
            raise ValueError(
                f"MODEL.NUM_CLASSES is {n_cfg} and no dataset is given (DATASETS.TRAIN and "
                "DATASETS.TEST are empty): set MODEL.NUM_CLASSES"
            )
        return n_cfg
    if cfg.DATASETS.TRAIN:
        _check_same_classes(list(cfg.DATASETS.TRAIN))
    ref = names[0]
    n_data = _num_classes_of(ref)
    if cfg.DATASETS.TRAIN:
        # Evaluation datasets must share the class space (checked when their classes are known
        # without loading them).
        for name in cfg.DATASETS.TEST:
            meta = MetadataCatalog.get(name)
            if name not in DatasetCatalog or not meta.has("thing_classes"):
                continue
            try:
                n_test = len(meta.thing_classes)
            except FileNotFoundError:
                continue
            if n_test != n_data:
                raise ValueError(
                    f"Test dataset {name!r} has {n_test} classes but training dataset {ref!r} "
                    f"has {n_data}"
                )
    if n_cfg == -1:
        frozen = cfg.is_frozen()
        if frozen:
            cfg.defrost()
        cfg.MODEL.NUM_CLASSES = n_data
        if frozen:
            cfg.freeze()
        logger.info("MODEL.NUM_CLASSES set to %d from dataset %r", n_data, ref)
    elif n_cfg != n_data:
        raise ValueError(
            f"MODEL.NUM_CLASSES is {n_cfg} but dataset {ref!r} has {n_data} classes; set "
            f"MODEL.NUM_CLASSES {n_data} (or -1 to take it from the dataset)"
        )
    return n_data
