"""Training and test data loaders.

- Training: :func:`build_train_loader` -- the datasets of ``DATASETS.TRAIN`` concatenated,
  empty images filtered, an infinite shuffled index stream (:class:`TrainingSampler`, one shard per
  rank), batches grouped by aspect ratio, resumable at an iteration (``start_iter``).
- Test: :func:`build_test_loader` -- one dataset, every image exactly once across ranks
  (:class:`InferenceSampler`), mapper in test mode.

Both yield lists of mapped dicts (see :class:`instseg.data.mapper.DatasetMapper`). The training
loader is infinite and has no ``len()``: run it for ``SOLVER.MAX_ITER`` iterations (with
Lightning, ``use_distributed_sampler=False`` because the sampler already shards by rank).

The samplers live in :mod:`instseg.data.samplers`, the datasets in :mod:`instseg.data.dataset`,
``MODEL.NUM_CLASSES`` resolution in :mod:`instseg.data.classes`.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .classes import _check_same_classes
from .dataset import MapDataset, get_dataset_dicts
from .seg_mapper import build_mapper
from .samplers import GroupedBatchSampler, InferenceSampler, InfiniteBatchSampler, TrainingSampler, _PositionSeededBatchSampler
from .validation import check_dataset_files, resolve_check_files

__all__ = ["build_train_loader", "build_test_loader", "trivial_batch_collator", "maybe_check_files", "DEFAULT_SAMPLER_SEED"]

logger = logging.getLogger(__name__)

# Seed of the training index stream when cfg.SEED < 0 and no seed is passed: every rank must use
# the same permutation, so a per-process random seed would break the sharding.
DEFAULT_SAMPLER_SEED = 0


def trivial_batch_collator(batch: List[Any]) -> List[Any]:
    """Collate function that returns the batch as the list of mapped dicts."""
    return batch


def _worker_init_fn(worker_id: int) -> None:
    # torch seeds each worker (base_seed + worker_id); seed numpy/random from it as well.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def maybe_check_files(cfg, dicts: List[dict], names: List[str]) -> bool:
    """The up-front scan of a loader's images (:func:`instseg.data.check_dataset_files`) when
    ``DATALOADER.CHECK_FILES`` asks for it: ``"auto"`` (default) scans when the loader has at
    most ``DATALOADER.CHECK_FILES_MAX_IMAGES`` images (10000: about 10-30 s with 8 threads),
    ``True`` always, ``False`` never. Every process (rank) scans the whole list, so that all
    stop with the same error. Returns whether it scanned.

    Raises:
        DatasetFilesError: missing, corrupt or mis-sized images (all listed).
        ValueError: an invalid ``DATALOADER.CHECK_FILES``.
    """
    dl = cfg.DATALOADER
    value = dl.get("CHECK_FILES", "auto") if hasattr(dl, "get") else getattr(dl, "CHECK_FILES", "auto")
    max_images = int(dl.get("CHECK_FILES_MAX_IMAGES", 10000) if hasattr(dl, "get") else 10000)
    if not resolve_check_files(value, len(dicts), max_images):
        if str(value).strip().lower() == "auto":
            logger.info(
                "Not scanning the %d image files of %s up front (more than DATALOADER.CHECK_FILES_MAX_IMAGES=%d; "
                "set DATALOADER.CHECK_FILES True to scan, or run tools/check_dataset.py)", len(dicts), names, max_images)
        return False
    n = check_dataset_files(dicts, desc=f"Checking images of {', '.join(names)}")
    logger.info("Checked %d image files of %s: all readable and of the json's size", n, names)
    return True


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
        mapper: replaces ``build_mapper(cfg, is_train=True)`` (``INPUT.DATASET_MAPPER_NAME``;
            default :class:`DatasetMapper`).
        seed: seed of the index stream (same on all ranks); default ``cfg.SEED``, or
            :data:`DEFAULT_SAMPLER_SEED` when ``cfg.SEED < 0``.

    Returns:
        A ``DataLoader`` yielding lists of ``SOLVER.IMS_PER_BATCH // world_size`` mapped dicts,
        forever (no ``len()``). Images without non-crowd instances are filtered when
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; with ``DATALOADER.ASPECT_RATIO_GROUPING`` every
        batch has only ``w >= h`` or only ``h > w`` images (original sizes). The index stream is
        deterministic given the seed; augmentations draw from torch's generator, seeded per
        worker from ``(seed, rank, start_iter)``.

    Before the loader is built, its images are scanned when ``DATALOADER.CHECK_FILES`` says so
    (:func:`maybe_check_files`).

    Raises:
        ValueError: no training dataset, a dataset empty after filtering (named), or
            ``IMS_PER_BATCH`` not a positive multiple of ``world_size``.
        DatasetFilesError: (a ``ValueError``) the up-front scan found missing, corrupt or
            mis-sized images (all listed).
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
    maybe_check_files(cfg, dicts, names)
    if seed is None:
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else DEFAULT_SAMPLER_SEED
    sampler = TrainingSampler(len(dicts), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        group_ids = [0 if d["width"] >= d["height"] else 1 for d in dicts]
        batch_sampler: Sampler = GroupedBatchSampler(sampler, group_ids, batch_size, start_iter)
    else:
        batch_sampler = InfiniteBatchSampler(sampler, batch_size, start_iter)
    batch_sampler = _PositionSeededBatchSampler(batch_sampler, seed, rank, start_iter)
    dataset = MapDataset(dicts, mapper if mapper is not None else build_mapper(cfg, is_train=True))
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
        mapper: replaces ``build_mapper(cfg, is_train=False)`` (``INPUT.DATASET_MAPPER_NAME``).

    Returns:
        A ``DataLoader`` (with ``len()``) yielding lists of mapped dicts without ``"instances"``.

    The images are scanned first when ``DATALOADER.CHECK_FILES`` says so (:func:`maybe_check_files`).

    Raises:
        KeyError: ``dataset_name`` is not registered.
        ValueError: the dataset is empty (named), or ``batch_size < 1``.
        DatasetFilesError: (a ``ValueError``) the up-front scan found missing, corrupt or
            mis-sized images (all listed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dicts = get_dataset_dicts([dataset_name], filter_empty=False)
    maybe_check_files(cfg, dicts, [dataset_name])
    sampler = InferenceSampler(len(dicts), rank=rank, world_size=world_size)
    dataset = MapDataset(dicts, mapper if mapper is not None else build_mapper(cfg, is_train=False))
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=trivial_batch_collator,
        worker_init_fn=_worker_init_fn,
    )
