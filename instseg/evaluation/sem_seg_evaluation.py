"""Semantic segmentation metrics (mIoU, fwIoU, per-class IoU, pixel accuracy) from a confusion matrix.

The definitions are Detectron2's ``SemSegEvaluator`` (``detectron2/evaluation/sem_seg_evaluation.py``),
which Mask2Former uses for its semantic results (and so FastInst's supplement App. C): a
``(C + 1) x (C + 1)`` confusion matrix ``conf[pred, gt]`` accumulated with ``np.bincount``, the
ignore label left out; IoU of a class = TP / (TP + FP + FN), over the classes that have ground-truth
pixels in the evaluated images; fwIoU weights each class's IoU by its share of ground-truth pixels.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from instseg.utils import comm

from .evaluator import DatasetEvaluator

__all__ = ["SemSegEvaluator", "semseg_metrics"]

logger = logging.getLogger(__name__)


def semseg_metrics(conf_matrix: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Metrics of a confusion matrix, in percent (0-100).

    Args:
        conf_matrix: int ``(C + 1, C + 1)``, ``conf[pred, gt]`` pixel counts; row ``C`` / column ``C``
            are the "ignored" bin (ground truth = ignore label), left out of every metric.
        class_names: name of each of the ``C`` classes (default ``"0"..``).

    Returns:
        ``{"mIoU", "fwIoU", "mACC", "pACC", "IoU-<name>"..., "ACC-<name>"...}``: mean IoU and mean
        accuracy over the classes with ground-truth pixels (IoU/ACC of the others is NaN),
        frequency-weighted IoU, pixel accuracy (correct / labelled pixels). NaN everywhere when no
        pixel is labelled.

    Raises:
        ValueError: a non-square matrix or ``len(class_names) != C``.
    """
    conf = np.asarray(conf_matrix)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 2:
        raise ValueError(f"conf_matrix must be (C + 1, C + 1) with C >= 1, got {conf.shape}")
    c = conf.shape[0] - 1
    names = [str(i) for i in range(c)] if class_names is None else list(class_names)
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = conf[:-1, :-1].sum(axis=0).astype(np.float64)
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(np.float64)
    acc = np.full(c, np.nan)
    iou = np.full(c, np.nan)
    valid = pos_gt > 0
    acc[valid] = tp[valid] / pos_gt[valid]
    union = pos_gt + pos_pred - tp
    iou_valid = valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    if total > 0:
        weights = pos_gt / total
        miou = float(iou[iou_valid].mean())
        fwiou = float((iou[iou_valid] * weights[iou_valid]).sum())
        macc = float(acc[valid].mean())
        pacc = float(tp.sum() / total)
    else:
        miou = fwiou = macc = pacc = float("nan")
    out: Dict[str, float] = OrderedDict(mIoU=100 * miou, fwIoU=100 * fwiou, mACC=100 * macc, pACC=100 * pacc)
    for n, v in zip(names, iou):
        out[f"IoU-{n}"] = 100 * float(v)
    for n, v in zip(names, acc):
        out[f"ACC-{n}"] = 100 * float(v)
    return out


class SemSegEvaluator(DatasetEvaluator):
    """mIoU, fwIoU, per-class IoU and accuracy, pixel accuracy of ``"sem_seg"`` predictions.

    Usage: ``reset()``, ``process(inputs, outputs)`` per batch on every DDP rank, ``evaluate()`` on
    every rank (the confusion matrices are summed onto rank 0, which returns the metrics; the others
    return ``{}``).

    Args:
        num_classes: ``C``; ground-truth values must be in ``0..C-1`` or ``ignore_label``.
        class_names: name of each class (default: ``"0".."C-1"``); from a registered dataset use
            its metadata's ``stuff_classes``.
        ignore_label: ground-truth value left out (Cityscapes / COCO: 255).
        output_dir: when given, rank 0 writes ``sem_seg_metrics.json`` there (NaN as ``null``).

    Ground truth: each input dict's ``"sem_seg_file_name"`` (a PNG of class ids, e.g. Cityscapes'
    ``_gtFine_labelTrainIds.png``) or, when that key is missing, a ``"sem_seg_gt"`` int tensor /
    array ``(H, W)`` at the original size. Prediction: each output's ``"sem_seg"`` float
    ``(C, H, W)`` at the original size; its argmax over ``C`` is the label.

    Raises:
        ValueError: ``num_classes < 1``; ``len(class_names) != num_classes``.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, *,
                 ignore_label: int = 255, output_dir: Optional[str] = None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._num_classes = int(num_classes)
        self._class_names = [str(i) for i in range(self._num_classes)] if class_names is None else list(class_names)
        if len(self._class_names) != self._num_classes:
            raise ValueError(f"{len(self._class_names)} class names for num_classes={self._num_classes}")
        self._ignore_label = int(ignore_label)
        self._output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        """Zero the confusion matrix."""
        n = self._num_classes + 1
        self._conf = np.zeros((n, n), dtype=np.int64)

    def _load_gt(self, inp: Dict) -> np.ndarray:
        if "sem_seg_file_name" in inp:
            from PIL import Image

            path = inp["sem_seg_file_name"]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"semantic ground truth {path} not found (for {inp.get('file_name')})")
            with Image.open(path) as im:
                return np.asarray(im, dtype=np.int64)
        if "sem_seg_gt" in inp:
            gt = inp["sem_seg_gt"]
            return (gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)).astype(np.int64)
        raise ValueError(f"{inp.get('file_name', '<input>')}: no 'sem_seg_file_name' (nor 'sem_seg_gt') in the input "
                         "dict; SemSegEvaluator needs the semantic ground truth")

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Add one batch to the confusion matrix.

        Raises:
            ValueError: ``len(inputs) != len(outputs)``; an output without ``"sem_seg"`` or not
                ``(C, H, W)``; prediction and ground truth of different sizes; a ground-truth value
                outside ``0..C-1`` that is not ``ignore_label`` (the message names the file).
            FileNotFoundError: a ``sem_seg_file_name`` that does not exist.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        c = self._num_classes
        for inp, out in zip(inputs, outputs):
            name = inp.get("sem_seg_file_name", inp.get("file_name", "<input>"))
            if "sem_seg" not in out:
                raise ValueError(f"{name}: the output has no 'sem_seg' (C, H, W) prediction")
            sem = torch.as_tensor(out["sem_seg"]).detach()
            if sem.dim() != 3 or sem.shape[0] != c:
                raise ValueError(f"{name}: 'sem_seg' must be ({c}, H, W), got {tuple(sem.shape)}")
            pred = sem.argmax(0).cpu().numpy().astype(np.int64)
            gt = self._load_gt(inp)
            if gt.shape != pred.shape:
                raise ValueError(f"{name}: ground truth is {gt.shape}, prediction {pred.shape} (data contract: "
                                 "outputs at the original height x width)")
            bad = (gt != self._ignore_label) & ((gt < 0) | (gt >= c))
            if bad.any():
                raise ValueError(f"{name}: ground-truth values {sorted(np.unique(gt[bad]).tolist())[:10]} outside "
                                 f"0..{c - 1} and not the ignore label {self._ignore_label}")
            gt = np.where(gt == self._ignore_label, c, gt)
            self._conf += np.bincount((c + 1) * pred.reshape(-1) + gt.reshape(-1),
                                      minlength=(c + 1) ** 2).reshape(c + 1, c + 1)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Sum the confusion matrices of all ranks and compute :func:`semseg_metrics`.

        Returns:
            On rank 0 ``{"sem_seg": {"mIoU", "fwIoU", "mACC", "pACC", "IoU-<class>"..., "ACC-<class>"...}}``
            (percent); ``{}`` on other ranks, and ``{}`` (with a warning) when no pixel was labelled.
        """
        conf = self._conf
        if comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather(self._conf, dst=0)
            if not comm.is_main_process():
                return {}
            conf = np.sum(parts, axis=0)
        if conf[:-1, :-1].sum() == 0:
            logger.warning("SemSegEvaluator: no labelled pixel was processed; nothing to evaluate")
            return {}
        metrics = semseg_metrics(conf, self._class_names)
        results = OrderedDict(sem_seg=metrics)
        if self._output_dir:
            from .coco_evaluation import _nan_to_none

            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "sem_seg_metrics.json"), "w") as f:
                json.dump(_nan_to_none(results), f, indent=2)
        logger.info("Semantic segmentation: mIoU %.3f, fwIoU %.3f, mACC %.3f, pACC %.3f",
                    metrics["mIoU"], metrics["fwIoU"], metrics["mACC"], metrics["pACC"])
        return results
