"""Datasets of the loaders: dataset dicts of registered names (:func:`get_dataset_dicts`) and the
map-style :class:`MapDataset` (dicts stored serialized, mapped on access)."""
from __future__ import annotations

import logging
import pickle
from typing import Any, Callable, List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .catalog import DatasetCatalog

__all__ = ["MapDataset", "get_dataset_dicts"]

logger = logging.getLogger(__name__)


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


def _has_instances(d: dict) -> bool:
    """Whether the training loader keeps ``d``: a non-crowd annotation; without ``annotations``, a
    non-crowd panoptic segment (``segments_info``); a semantic dict (``sem_seg_file_name``, no
    ``annotations`` nor ``segments_info``) is always kept."""
    if "annotations" in d:
        return any(not a.get("iscrowd", 0) for a in d["annotations"])
    if "segments_info" in d:
        return any(not s.get("iscrowd", 0) for s in d["segments_info"])
    return "sem_seg_file_name" in d


def get_dataset_dicts(names: Sequence[str], filter_empty: bool = True) -> List[dict]:
    """Dataset dicts of ``names`` concatenated (in order).

    Args:
        names: registered dataset names.
        filter_empty: drop images without any non-crowd annotation (logged with counts); a
            panoptic dict (``segments_info``, no ``annotations``) counts its non-crowd segments,
            a semantic dict (``sem_seg_file_name`` only) is never dropped.

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
