"""COCO instance segmentation / detection AP (Detectron2's ``COCOEvaluator`` conventions).

Predictions follow the data contract (docs/architecture.md): per image ``{"scores": float (K,), "labels": int64
(K,) contiguous 0..C-1, "masks": bool (K, height, width) at the original size, "boxes": float
(K, 4) xyxy pixels}``. They are turned into COCO result dicts (RLE masks, xywh boxes, the json's
category ids), gathered over DDP ranks, and scored by a pycocotools-compatible COCOeval: hotcoco
by default (the same numbers as pycocotools, bit for bit, in a fraction of the time:
docs/architecture.md, "COCO evaluation backend"), pycocotools or faster-coco-eval on request
(``TEST.COCO_EVAL_BACKEND``).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import itertools
import json
import logging
import math
import os
import warnings
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

from instseg.utils import comm

from .evaluator import DatasetEvaluator

__all__ = [
    "COCOEvaluator",
    "instances_to_coco_json",
    "fast_eval_available",
    "COCO_EVAL_BACKENDS",
    "DEFAULT_COCO_EVAL_BACKEND",
    "check_coco_eval_backend",
    "coco_eval_backend_available",
]

logger = logging.getLogger(__name__)

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_TASKS = ("segm", "bbox")

#: The COCOeval implementations :class:`COCOEvaluator` can score with (``TEST.COCO_EVAL_BACKEND``):
#: ``"hotcoco"`` (a dependency, the default), ``"pycocotools"`` (the reference, a dependency) and
#: ``"faster_coco_eval"`` (optional: ``pip install instseg[fast-eval]``).
COCO_EVAL_BACKENDS = ("hotcoco", "pycocotools", "faster_coco_eval")
DEFAULT_COCO_EVAL_BACKEND = "hotcoco"
_BACKEND_MODULES = {"hotcoco": "hotcoco", "pycocotools": "pycocotools.cocoeval", "faster_coco_eval": "faster_coco_eval"}


def check_coco_eval_backend(backend, key: str = "TEST.COCO_EVAL_BACKEND") -> str:
    """Validate a COCO evaluation backend name.

    Args:
        backend: one of :data:`COCO_EVAL_BACKENDS` (a str; case and surrounding spaces are ignored).
        key: the config key (or argument) the value came from, named in the error.

    Returns:
        The name in lower case, e.g. ``"hotcoco"``.

    Raises:
        ValueError: ``backend`` is not one of :data:`COCO_EVAL_BACKENDS` (the message names
            ``key``, the value and the allowed values).
    """
    name = backend.strip().lower() if isinstance(backend, str) else backend
    if name not in COCO_EVAL_BACKENDS:
        allowed = ", ".join(repr(b) for b in COCO_EVAL_BACKENDS)
        raise ValueError(f"{key} must be one of {allowed}, got {backend!r}")
    return name


def coco_eval_backend_available(backend: str) -> bool:
    """True when the backend's package imports (``backend`` as in :data:`COCO_EVAL_BACKENDS`).

    Raises:
        ValueError: unknown backend name.
    """
    name = check_coco_eval_backend(backend, key="backend")
    try:
        importlib.import_module(_BACKEND_MODULES[name])
    except Exception:
        return False
    return True


def fast_eval_available() -> bool:
    """True when ``faster_coco_eval`` (optional, ``pip install instseg[fast-eval]``) imports."""
    return coco_eval_backend_available("faster_coco_eval")


def _to_numpy(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if dtype is not None else x


def instances_to_coco_json(
    output: Dict,
    image_id: int,
    contiguous_to_dataset_id: Dict[int, int],
    with_masks: bool = True,
    with_boxes: bool = True,
) -> List[Dict]:
    """Convert one image's model output into COCO result dicts.

    Args:
        output: ``{"scores": (K,), "labels": int (K,), "masks": bool (K, H, W), "boxes": (K, 4)
            xyxy}`` (tensors or arrays; ``"masks"`` only needed with ``with_masks``; ``"boxes"``
            is derived from the masks when missing).
        image_id: the json's image id.
        contiguous_to_dataset_id: contiguous label -> json category id.

    Returns:
        ``[{"image_id", "category_id", "score", "bbox": [x, y, w, h], "segmentation": RLE with
        str counts}, ...]`` (``"bbox"``/``"segmentation"`` present per ``with_boxes``/``with_masks``).

    Raises:
        ValueError: lengths of the fields differ, or a label has no category id.
    """
    scores = _to_numpy(output["scores"], np.float64).reshape(-1)
    labels = _to_numpy(output["labels"], np.int64).reshape(-1)
    num = len(scores)
    if len(labels) != num:
        raise ValueError(f"image {image_id}: {num} scores but {len(labels)} labels")
    if num == 0:
        return []
    try:
        cat_ids = [int(contiguous_to_dataset_id[int(lab)]) for lab in labels]
    except KeyError as e:
        raise ValueError(
            f"image {image_id}: label {e.args[0]} has no category id "
            f"(known contiguous labels 0..{len(contiguous_to_dataset_id) - 1})"
        ) from None

    rles = None
    masks_t = output.get("masks")
    if with_masks:
        if masks_t is None:
            raise ValueError(f"image {image_id}: 'segm' evaluation needs 'masks' in the output")
        masks = _to_numpy(masks_t)
        if masks.ndim != 3 or masks.shape[0] != num:
            raise ValueError(f"image {image_id}: masks of shape {masks.shape} for {num} instances")
        if masks.dtype.kind == "f":
            raise ValueError(f"image {image_id}: masks must be bool (thresholded), got {masks.dtype}")
        if masks.dtype != np.bool_:
            masks = masks != 0
        # (H, W, K) Fortran-ordered uint8: one encode call for all instances.
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")

    boxes = None
    if with_boxes:
        if output.get("boxes") is not None:
            boxes = _to_numpy(output["boxes"], np.float64).reshape(-1, 4)
        elif masks_t is not None:
            from instseg.modeling.meta_arch import boxes_from_masks

            boxes = boxes_from_masks(torch.as_tensor(_to_numpy(masks_t)).bool()).double().numpy()
        else:
            raise ValueError(f"image {image_id}: 'bbox' evaluation needs 'boxes' or 'masks'")
        if boxes.shape[0] != num:
            raise ValueError(f"image {image_id}: {boxes.shape[0]} boxes for {num} instances")
        boxes = boxes.copy()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh

    results = []
    for k in range(num):
        r = {"image_id": int(image_id), "category_id": cat_ids[k], "score": float(scores[k])}
        if boxes is not None:
            r["bbox"] = [float(v) for v in boxes[k]]
        if rles is not None:
            r["segmentation"] = rles[k]
        results.append(r)
    return results


class COCOEvaluator(DatasetEvaluator):
    """COCO AP of instance masks (``"segm"``) and boxes (``"bbox"``) against a COCO json file.

    Usage: ``reset()``, then ``process(inputs, outputs)`` per batch (on every DDP rank), then
    ``evaluate()``. Only the images seen by ``process`` are scored (``params.imgIds``), so a subset
    of the json can be evaluated. Predictions of an image id seen twice (e.g. the padding of a
    ``DistributedSampler``) are counted once.

    Args:
        json_file: COCO instances json with ``images``, ``annotations`` and ``categories``.
        output_dir: when given, rank 0 writes ``coco_instances_results.json`` (COCO result dicts,
            loadable with ``COCO.loadRes``) and ``metrics.json`` (NaN written as ``null``) there.
        tasks: subset of ``("segm", "bbox")``.
        per_category: also report ``"AP-<category name>"`` per task.
        contiguous_to_dataset_id: contiguous label -> json category id. Default: the json's
            categories sorted by id, i.e. label ``i`` is the ``i``-th smallest category id (the
            dataset catalog's ``thing_dataset_id_to_contiguous_id``, inverted).
        backend: the COCOeval implementation (``TEST.COCO_EVAL_BACKEND``), one of
            :data:`COCO_EVAL_BACKENDS`: ``"hotcoco"`` (default; the 12 summary numbers and
            ``eval["precision"]`` identical to pycocotools' in the tests and in
            tools/benchmark_coco_eval.py, 1/18 of its time for segm), ``"pycocotools"`` or
            ``"faster_coco_eval"``. A backend whose package does not import falls back to
            pycocotools with a warning (:attr:`backend` says which one is used).
        use_fast_eval: deprecated; ``True`` means ``backend="faster_coco_eval"``.
        max_dets_per_image: ``TEST.DETECTIONS_PER_IMAGE``: at most this many predictions per image
            are scored (the highest scores; a model that returns more is cut here too) and COCOeval's
            ``maxDets`` is ``[1, 10, this]`` (``[1, this]`` below 10); AP is read at the last.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: unknown task or backend, or a mapped category id that is not in the json.
    """

    def __init__(
        self,
        json_file: str,
        output_dir: Optional[str] = None,
        tasks: Sequence[str] = ("segm", "bbox"),
        per_category: bool = False,
        contiguous_to_dataset_id: Optional[Dict[int, int]] = None,
        use_fast_eval: Optional[bool] = None,
        max_dets_per_image: int = 100,
        backend: str = DEFAULT_COCO_EVAL_BACKEND,
    ):
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"COCO json not found: {json_file}")
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in _TASKS]
        if bad or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {_TASKS}, got {tasks}")
        self._json_file = json_file
        self._output_dir = output_dir
        self._tasks = tasks
        self._per_category = bool(per_category)
        self._max_dets = int(max_dets_per_image)
        if self._max_dets < 1:
            raise ValueError(f"max_dets_per_image must be >= 1, got {max_dets_per_image}")

        backend = check_coco_eval_backend(backend, key="backend (TEST.COCO_EVAL_BACKEND)")
        if use_fast_eval is not None:
            warnings.warn("COCOEvaluator(use_fast_eval=...) is deprecated: pass backend='faster_coco_eval' "
                          "(TEST.COCO_EVAL_BACKEND)", DeprecationWarning, stacklevel=2)
            if use_fast_eval:
                backend = "faster_coco_eval"
        if backend != "pycocotools" and not coco_eval_backend_available(backend):
            logger.warning("COCO evaluation backend %r is not installed; using pycocotools", backend)
            backend = "pycocotools"
        self._backend = backend
        if backend == "hotcoco":
            from hotcoco import COCO
        elif backend == "faster_coco_eval":
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt = COCO(json_file)

        cats = sorted(self._coco_gt.loadCats(self._coco_gt.getCatIds()), key=lambda c: c["id"])
        self._cat_names = {int(c["id"]): c["name"] for c in cats}
        if contiguous_to_dataset_id is None:
            contiguous_to_dataset_id = {i: int(c["id"]) for i, c in enumerate(cats)}
        else:
            contiguous_to_dataset_id = {int(k): int(v) for k, v in contiguous_to_dataset_id.items()}
            missing = sorted(set(contiguous_to_dataset_id.values()) - set(self._cat_names))
            if missing:
                raise ValueError(f"category ids {missing} are not in the categories of {json_file}")
        self._contiguous_to_dataset_id = contiguous_to_dataset_id
        self._valid_img_ids = set(int(i) for i in self._coco_gt.getImgIds())
        self.reset()

    # ------------------------------------------------------------------ API
    @property
    def backend(self) -> str:
        """The COCOeval implementation in use (after any fallback to ``"pycocotools"``)."""
        return self._backend

    @property
    def contiguous_to_dataset_id(self) -> Dict[int, int]:
        """Contiguous label -> json category id used to convert predictions."""
        return dict(self._contiguous_to_dataset_id)

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._predictions: List[Dict] = []

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Convert one batch of outputs to COCO results (kept in host memory, RLE-compressed).

        Args:
            inputs: the model's input dicts; ``"image_id"`` is required, ``"height"``/``"width"``
                (when present) are checked against the masks' size.
            outputs: one dict per input (docs/architecture.md, Data contract); an output of the form
                ``{"instances": {...}}`` is accepted too.

        Raises:
            ValueError: ``len(inputs) != len(outputs)``, masks not at ``(height, width)``, or a
                label without category id.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "instances" in out and isinstance(out["instances"], dict):
                out = out["instances"]
            image_id = int(inp["image_id"])
            masks = out.get("masks")
            if masks is not None and "height" in inp and "width" in inp and masks.shape[0] > 0:
                expected = (int(inp["height"]), int(inp["width"]))
                if tuple(masks.shape[-2:]) != expected:
                    raise ValueError(
                        f"image {image_id}: masks are {tuple(masks.shape[-2:])}, expected the "
                        f"original size {expected} (data contract: outputs at height x width)"
                    )
            scores = out.get("scores")
            if scores is not None and scores.numel() > self._max_dets:
                top = scores.topk(self._max_dets).indices
                out = {k: (v[top] if torch.is_tensor(v) and v.shape[:1] == scores.shape else v) for k, v in out.items()}
            instances = instances_to_coco_json(
                out,
                image_id,
                self._contiguous_to_dataset_id,
                with_masks="segm" in self._tasks,
                with_boxes="bbox" in self._tasks,
            )
            self._predictions.append({"image_id": image_id, "instances": instances})

    def evaluate(self, img_ids: Optional[Iterable[int]] = None) -> Dict[str, Dict[str, float]]:
        """Gather predictions from all ranks and compute COCO AP on rank 0.

        Args:
            img_ids: restrict scoring to these image ids (default: every processed image).

        Returns:
            On rank 0: ``{"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"[, "AP-<name>"...]},
            "bbox": {...}}`` in percent (0-100), ``float("nan")`` where COCO's value is undefined
            (e.g. ``APs`` without small ground truth, or a category absent from the evaluated
            images). No prediction at all gives 0 for every defined metric (with a warning). On
            other ranks: ``{}``. ``{}`` too when no image was processed (with a warning).

        Raises:
            ValueError: a processed image id is not in the json.
        """
        if comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.all_gather(self._predictions)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain(*gathered))
        else:
            predictions = self._predictions

        if len(predictions) == 0:
            logger.warning("COCOEvaluator: no image was processed; nothing to evaluate")
            return {}

        seen, results = set(), []
        for p in predictions:  # first occurrence of each image id wins
            if p["image_id"] in seen:
                continue
            seen.add(p["image_id"])
            results.extend(p["instances"])
        unknown = sorted(seen - self._valid_img_ids)
        if unknown:
            raise ValueError(
                f"{len(unknown)} processed image ids are not in {self._json_file}: {unknown[:10]}"
            )
        eval_ids = sorted(seen) if img_ids is None else sorted(int(i) for i in img_ids)

        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            with open(path, "w") as f:
                json.dump(results, f)
            logger.info("Saved %d COCO results to %s", len(results), path)

        logger.info(
            "Evaluating %d predictions on %d images (%s) with %s",
            len(results), len(eval_ids), ", ".join(self._tasks),
            self._backend,
        )
        metrics: Dict[str, Dict[str, float]] = OrderedDict()
        for task in self._tasks:
            metrics[task] = self._evaluate_task(task, results, eval_ids)

        if self._output_dir:
            path = os.path.join(self._output_dir, "metrics.json")
            with open(path, "w") as f:
                json.dump(_nan_to_none(metrics), f, indent=2)
        return metrics

    # ------------------------------------------------------------- internals
    def _load_results(self, results: List[Dict]):
        """COCO object of the results; an empty one (no annotations) when there are none."""
        gt = self._coco_gt
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                return gt.loadRes(results)
        dt = type(gt)()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
        return dt

    def _evaluate_task(self, task: str, results: List[Dict], img_ids: List[int]) -> Dict[str, float]:
        task_results = []
        for r in results:
            r = dict(r)
            if task == "segm":
                # Without "bbox", loadRes takes the area from the mask (as Detectron2 does).
                r.pop("bbox", None)
            else:
                r.pop("segmentation", None)
            task_results.append(r)
        if not task_results:
            logger.warning("No predictions for '%s': every AP is 0 where ground truth exists", task)

        coco_dt = self._load_results(task_results)
        if self._backend == "hotcoco":
            from hotcoco import COCOeval

            coco_eval = COCOeval(self._coco_gt, coco_dt, task)
        elif self._backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster as COCOeval

            coco_eval = COCOeval(self._coco_gt, coco_dt, task, print_function=logger.debug)
        else:
            from pycocotools.cocoeval import COCOeval

            coco_eval = COCOeval(self._coco_gt, coco_dt, task)
        coco_eval.params.imgIds = list(img_ids)
        coco_eval.params.maxDets = sorted({1, min(10, self._max_dets), self._max_dets})
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_eval.evaluate()
            coco_eval.accumulate()
            if self._max_dets == 100 and self._backend == "pycocotools":
                coco_eval.summarize()
        if buf.getvalue().strip():
            logger.debug("%s output (%s):\n%s", self._backend, task, buf.getvalue())

        metrics = _summary_metrics(coco_eval)
        if self._per_category:
            metrics.update(self._per_category_ap(coco_eval))
        self._log_table(task, metrics)
        return metrics

    def _per_category_ap(self, coco_eval) -> Dict[str, float]:
        precisions = coco_eval.eval["precision"]  # (iou, recall, cls, area range, max dets)
        cat_ids = list(coco_eval.params.catIds)
        out = OrderedDict()
        for contiguous in sorted(self._contiguous_to_dataset_id):
            cat_id = self._contiguous_to_dataset_id[contiguous]
            k = cat_ids.index(cat_id)
            p = precisions[:, :, k, 0, -1]
            p = p[p > -1]
            out[f"AP-{self._cat_names[cat_id]}"] = float(np.mean(p) * 100) if p.size else float("nan")
        return out

    def _log_table(self, task: str, metrics: Dict[str, float]) -> None:
        summary = [[k, metrics[k]] for k in _METRICS]
        logger.info("Evaluation results for %s:\n%s", task, _format_table(
            [[f"{v:.3f}" for _, v in summary]], [k for k, _ in summary]))
        per_cat = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
        if per_cat:
            n_cols = 3
            flat = list(itertools.chain(*[(name, f"{v:.3f}") for name, v in per_cat]))
            rows = [flat[i: i + 2 * n_cols] for i in range(0, len(flat), 2 * n_cols)]
            logger.info("Per-category %s AP:\n%s", task,
                        _format_table(rows, ["category", "AP"] * n_cols))


def _summary_metrics(coco_eval) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (percent) from ``coco_eval.eval["precision"]``.

    Same arithmetic as pycocotools' ``summarize()`` (mean over the entries > -1, at the largest
    ``maxDets``), but independent of ``maxDets == 100``; -1 (undefined) becomes NaN.
    """
    p = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])  # (T, R, K, A, M)
    iou_thrs = np.asarray(p.iouThrs)
    area_lbl = list(p.areaRngLbl)

    def mean_ap(iou=None, area="all"):
        s = precision
        if iou is not None:
            s = s[np.where(np.isclose(iou_thrs, iou))[0]]
        s = s[:, :, :, area_lbl.index(area), -1]
        s = s[s > -1]
        return float(np.mean(s) * 100) if s.size else float("nan")

    return OrderedDict(
        AP=mean_ap(),
        AP50=mean_ap(0.5),
        AP75=mean_ap(0.75),
        APs=mean_ap(area="small"),
        APm=mean_ap(area="medium"),
        APl=mean_ap(area="large"),
    )


def _format_table(rows: List[List], headers: List[str]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers, tablefmt="pipe", numalign="left", stralign="center")
    except ImportError:  # pragma: no cover - fvcore brings tabulate
        lines = [" | ".join(str(h) for h in headers)]
        lines += [" | ".join(str(c) for c in r) for r in rows]
        return "\n".join(lines)


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
