"""Helpers every set-prediction criterion needs after Hungarian matching (DETR's ``SetCriterion``).

A matcher returns, per image ``b``, a pair ``(src_b, tgt_b)`` of equal-length int64 tensors:
prediction ``src_b[j]`` of image ``b`` is matched with its target ``tgt_b[j]``. From these:

* :func:`matched_prediction_index`: ``(batch_idx, src_idx)`` to gather the matched predictions of
  a ``(B, N, ...)`` tensor in one indexing (DETR's ``_get_src_permutation_idx``);
* :func:`gather_matched_targets`: the matched targets' field (``labels``, ``masks``, ``boxes``, ...)
  concatenated over the batch in the same order;
* :func:`matched_target_classes`: the ``(B, N)`` class target of every prediction, the
  no-object / background index where unmatched.

The DETR normalizer (number of ground-truth instances averaged over the DDP ranks) is
:func:`instseg.modeling.losses.num_instances_across_ranks`.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

__all__ = ["gather_matched_targets", "matched_prediction_index", "matched_target_classes"]

_Indices = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def matched_prediction_index(indices: _Indices, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch and prediction indices of all matches, image by image in the matcher's order.

    Args:
        indices: per image ``(src_b, tgt_b)``, int64 ``(R_b,)`` each (any device).
        device: device of the returned tensors (default: that of ``src_b``, CPU for an empty batch).

    Returns:
        ``(batch_idx, src_idx)``: int64 ``(R,)`` each, ``R = sum_b R_b``; ``batch_idx`` repeats ``b``
        ``R_b`` times, ``src_idx`` is the concatenation of the ``src_b``. ``x[batch_idx, src_idx]``
        of a ``(B, N, ...)`` tensor is ``(R, ...)``, row ``r`` the ``r``-th match.
    """
    if len(indices) == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    src_idx = torch.cat([src.to(device=device, dtype=torch.int64) for src, _ in indices])
    batch_idx = torch.cat(
        [torch.full((len(src),), b, dtype=torch.int64, device=src_idx.device) for b, (src, _) in enumerate(indices)]
    )
    return batch_idx, src_idx


def gather_matched_targets(
    targets: Sequence[Dict[str, torch.Tensor]], indices: _Indices, key: str, device=None
) -> torch.Tensor:
    """The field ``key`` of the matched targets, concatenated over the batch.

    Args:
        targets: per image a dict whose ``key`` entry has the image's targets along dim 0
            (``labels`` ``(M_b,)``, ``masks`` ``(M_b, H, W)``, ``boxes`` ``(M_b, 4)``, ...).
        indices: per image ``(src_b, tgt_b)``, as the matcher returns them.
        key: the field to gather.
        device: device of the result (default: that of the targets' field).

    Returns:
        ``(R, ...)`` with the field's dtype: row ``r`` is ``targets[b][key][tgt_b[j]]`` for the
        ``r``-th match (same order as :func:`matched_prediction_index`).
    """
    if len(targets) != len(indices):
        raise ValueError(f"{len(indices)} matched images for {len(targets)} targets")
    parts = []
    for t, (_, tgt) in zip(targets, indices):
        field = t[key]
        parts.append(field[tgt.to(field.device)].to(device) if device is not None else field[tgt.to(field.device)])
    return torch.cat(parts)


def matched_target_classes(
    targets: Sequence[Dict[str, torch.Tensor]],
    indices: _Indices,
    shape: Tuple[int, int],
    background: int,
    device=None,
) -> torch.Tensor:
    """Class target of every prediction: the matched target's label, else ``background``.

    Args:
        targets: per image ``"labels"`` int64 ``(M_b,)``.
        indices: per image ``(src_b, tgt_b)``.
        shape: ``(B, N)``: images and predictions per image (queries, slots or pixels).
        background: index of the no-object class (``K`` for sigmoid classifiers with K classes and
            for softmax classifiers with ``K + 1`` outputs).
        device: device of the result.

    Returns:
        int64 ``(B, N)``: ``out[b, src_b[j]] = targets[b]["labels"][tgt_b[j]]``, ``background``
        elsewhere.
    """
    target_classes = torch.full(tuple(shape), background, dtype=torch.int64, device=device)
    batch_idx, src_idx = matched_prediction_index(indices, target_classes.device)
    target_classes[batch_idx, src_idx] = gather_matched_targets(targets, indices, "labels", target_classes.device).to(
        torch.int64
    )
    return target_classes
