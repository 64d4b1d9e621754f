"""Panoptic quality (PQ, SQ, RQ; all / things / stuff; per class) by cityscapesscripts' panoptic evaluation.

cityscapesscripts 2.3.0 ``evaluation/evalPanopticSemanticLabeling.py`` is panopticapi's
``pq_compute`` (COCO panoptic format: a json with ``annotations`` / ``categories`` and one RGB PNG
of segment ids per image, ``id = R + 256 G + 256^2 B``); panopticapi itself is not on PyPI. Its
``pq_compute_single_core`` (matching, IoU > 0.5, void and crowd handling) and ``PQStat`` are used
in-process (its ``pq_compute_multi_core`` would start a pool of ``cpu_count()`` processes). One
shim, :func:`pq_average_safe`: the library's ``PQStat.pq_average`` divides by the number of
categories of a group, so a ground truth without stuff (or things) categories raises
``ZeroDivisionError``; the shim returns NaN for that group instead.

Works for any COCO-panoptic-format ground truth: Cityscapes (``createPanopticImgs`` output,
``cityscapes_panoptic_<split>.json`` + ``cityscapes_panoptic_<split>/``) and COCO panoptic.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from instseg.utils import comm

from .evaluator import DatasetEvaluator

__all__ = ["PanopticEvaluator", "pq_average_safe", "id2rgb"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIX = "_leftImg8bit.png"


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment ids ``(H, W)`` -> uint8 RGB ``(H, W, 3)`` with ``id = R + 256 G + 256^2 B`` (panopticapi's
    ``id2rgb``, the inverse of cityscapesscripts' ``rgb2id``).

    Raises:
        ValueError: an id outside ``0..256^3 - 1``.
    """
    ids = np.asarray(id_map).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError(f"segment ids must be in 0..{256 ** 3 - 1}, got {ids.min()}..{ids.max()}")
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    for i in range(3):
        rgb[..., i] = ids % 256
        ids = ids // 256
    return rgb


def pq_average_safe(pq_stat: Any, categories: Dict[int, Dict], isthing: Optional[bool]) -> tuple:
    """``pq_stat.pq_average(categories, isthing)`` (cityscapesscripts' ``PQStat``), but a group with no
    evaluated category gives ``{"pq": nan, "sq": nan, "rq": nan, "n": 0}`` instead of raising
    ``ZeroDivisionError``. Returns ``(averages, per_class)`` as the library does."""
    try:
        return pq_stat.pq_average(categories, isthing=isthing)
    except ZeroDivisionError:
        per_class = {label: {"pq": 0.0, "sq": 0.0, "rq": 0.0} for label, info in categories.items()
                     if isthing is None or (info["isthing"] == 1) == isthing}
        nan = float("nan")
        return {"pq": nan, "sq": nan, "rq": nan, "n": 0}, per_class


class PanopticEvaluator(DatasetEvaluator):
    """PQ, SQ, RQ (percent) for all, thing and stuff categories and per category.

    Usage: ``reset()``, ``process(inputs, outputs)`` per batch on every DDP rank, ``evaluate()`` on
    every rank (PNG-encoded predictions are gathered onto rank 0, written to a temporary folder with
    a prediction json and scored there; other ranks return ``{}``). Only the processed images are
    scored; an image seen twice counts once.

    Args:
        gt_json: COCO-panoptic ground-truth json (``images``, ``annotations`` with ``file_name``,
            ``image_id``, ``segments_info``; ``categories`` with ``id``, ``name``, ``isthing``).
        gt_folder: folder of the ground-truth PNGs named by the annotations' ``file_name``.
        category_ids: the dataset category id of each contiguous class id the model predicts
            (``category_ids[c]``); default: the json's category ids sorted ascending (Detectron2's
            contiguous-id convention).
        output_dir: when given, rank 0 writes ``panoptic_metrics.json`` there (NaN as ``null``).

    Prediction per image: ``"panoptic_seg"``, either the pair ``(seg (H, W) int, segments_info)``
    that :func:`instseg.modeling.panoptic.panoptic_inference` returns or ``seg`` with a separate
    ``"segments_info"`` key; ``category_id`` of a segment is contiguous. The image is matched to the
    ground truth by the input's ``"image_id"``, else by the stem of its ``"file_name"`` (without
    ``_leftImg8bit.png`` for Cityscapes).

    Raises:
        FileNotFoundError: ``gt_json`` or ``gt_folder`` missing.
    """

    def __init__(self, gt_json: str, gt_folder: str, *, category_ids: Optional[Sequence[int]] = None,
                 output_dir: Optional[str] = None):
        if not os.path.isfile(gt_json):
            raise FileNotFoundError(f"panoptic ground-truth json {gt_json} not found")
        if not os.path.isdir(gt_folder):
            raise FileNotFoundError(f"panoptic ground-truth folder {gt_folder} not found")
        with open(gt_json) as f:
            gt = json.load(f)
        self._gt_json = os.path.abspath(gt_json)
        self._gt_folder = os.path.abspath(gt_folder)
        self._categories = {int(c["id"]): c for c in gt["categories"]}
        self._gt_anns = {str(a["image_id"]): a for a in gt["annotations"]}
        self._category_ids = (sorted(self._categories) if category_ids is None else [int(c) for c in category_ids])
        unknown = [c for c in self._category_ids if c not in self._categories]
        if unknown:
            raise ValueError(f"category_ids {unknown} are not categories of {gt_json}")
        self._output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._predictions: List[Dict[str, Any]] = []

    def _image_id(self, inp: Dict) -> str:
        if "image_id" in inp and str(inp["image_id"]) in self._gt_anns:
            return str(inp["image_id"])
        base = os.path.basename(str(inp.get("file_name", "")))
        stem = base[: -len(_IMAGE_SUFFIX)] if base.endswith(_IMAGE_SUFFIX) else os.path.splitext(base)[0]
        if stem in self._gt_anns:
            return stem
        raise ValueError(f"{inp.get('file_name', '<input>')} (image_id {inp.get('image_id')!r}): no annotation "
                         f"with this image_id or file stem in {self._gt_json}")

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Keep one batch of predictions as PNG bytes plus segments (dataset category ids).

        Raises:
            ValueError: ``len(inputs) != len(outputs)``; no ``"panoptic_seg"``; a segment id in the
                map without an entry in ``segments_info`` or the reverse; a ``category_id`` outside
                ``0..len(category_ids)-1``; an image not in the ground truth (messages name the file).
        """
        from PIL import Image

        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            name = inp.get("file_name", "<input>")
            if "panoptic_seg" not in out:
                raise ValueError(f"{name}: the output has no 'panoptic_seg'")
            pan = out["panoptic_seg"]
            if isinstance(pan, (tuple, list)):
                seg, segments = pan
            else:
                seg, segments = pan, out.get("segments_info")
                if segments is None:
                    raise ValueError(f"{name}: 'panoptic_seg' without 'segments_info'")
            seg = (seg.detach().cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)).astype(np.int64)
            image_id = self._image_id(inp)
            ids_in_map = {int(v) for v in np.unique(seg)} - {0}
            ids_in_info = {int(s["id"]) for s in segments}
            if ids_in_map != ids_in_info:
                raise ValueError(f"{name}: segment ids in the map {sorted(ids_in_map)} and in segments_info "
                                 f"{sorted(ids_in_info)} differ")
            segs = []
            for s in segments:
                c = int(s["category_id"])
                if not 0 <= c < len(self._category_ids):
                    raise ValueError(f"{name}: segment {s['id']} has category_id {c} outside "
                                     f"0..{len(self._category_ids) - 1}")
                segs.append({"id": int(s["id"]), "category_id": self._category_ids[c]})
            buf = io.BytesIO()
            Image.fromarray(id2rgb(seg)).save(buf, format="PNG", compress_level=1)
            self._predictions.append({"image_id": image_id, "png": buf.getvalue(), "segments_info": segs})

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Gather, write the predictions and run cityscapesscripts' PQ computation.

        Returns:
            On rank 0 ``{"panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st",
            "RQ_st", "PQ-<name>"..., "SQ-<name>"..., "RQ-<name>"...}}`` in percent (a category with no
            TP, FP or FN in the evaluated images has 0, as in the library; a group without
            categories NaN); ``{}`` on other ranks and when no image was processed.

        Raises:
            RuntimeError: the library raised (e.g. a segment with an unknown category).
        """
        predictions = comm.gather_lists_to_main(self._predictions)
        if predictions is None:  # not the main process
            return {}
        if not predictions:
            logger.warning("PanopticEvaluator: no image was processed; nothing to evaluate")
            return {}
        by_id: Dict[str, Dict[str, Any]] = {}
        for p in predictions:
            by_id.setdefault(p["image_id"], p)
        with tempfile.TemporaryDirectory(prefix="panoptic_eval_") as pred_folder:
            pairs = []
            for image_id in sorted(by_id):
                p = by_id[image_id]
                file_name = f"{image_id}.png"
                with open(os.path.join(pred_folder, file_name), "wb") as f:
                    f.write(p["png"])
                pairs.append((self._gt_anns[image_id],
                              {"image_id": image_id, "file_name": file_name,
                               "segments_info": [dict(s) for s in p["segments_info"]]}))
            results = self._compute(pairs, pred_folder)
        metrics = self._to_metrics(results)
        out = OrderedDict(panoptic_seg=metrics)
        if self._output_dir:
            from .coco_evaluation import _nan_to_none

            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "panoptic_metrics.json"), "w") as f:
                json.dump(_nan_to_none(out), f, indent=2)
        self._log_table(metrics)
        return out

    def _compute(self, pairs: List[tuple], pred_folder: str) -> Dict[str, Any]:
        import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan

        logger.info("Evaluating %d images with cityscapesscripts' evalPanopticSemanticLabeling", len(pairs))
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                pq_stat = cs_pan.pq_compute_single_core(0, pairs, self._gt_folder, pred_folder, self._categories)
            except Exception as e:  # the library's get_traceback re-raises after printing
                raise RuntimeError(f"cityscapesscripts' panoptic evaluation failed: {e}") from e
        results: Dict[str, Any] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = pq_average_safe(pq_stat, self._categories, isthing)
            if name == "All":
                results["per_class"] = per_class
        return results

    def _to_metrics(self, results: Dict[str, Any]) -> Dict[str, float]:
        m: Dict[str, float] = OrderedDict()
        for key, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for k in ("pq", "sq", "rq"):
                m[k.upper() + suffix] = 100.0 * float(results[key][k])
        for k in ("pq", "sq", "rq"):
            for cid in self._category_ids:
                m[f"{k.upper()}-{self._categories[cid]['name']}"] = 100.0 * float(results["per_class"][cid][k])
        return m

    def _log_table(self, m: Dict[str, float]) -> None:
        from .coco_evaluation import _format_table

        rows = [[name, f"{m['PQ' + s]:.3f}", f"{m['SQ' + s]:.3f}", f"{m['RQ' + s]:.3f}"]
                for name, s in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))]
        logger.info("Panoptic segmentation (cityscapesscripts), %s:\n%s", self._gt_json,
                    _format_table(rows, ["", "PQ", "SQ", "RQ"]))
