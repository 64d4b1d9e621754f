"""Cityscapes instance segmentation AP with the official cityscapesscripts evaluation.

Predictions follow the data contract (docs/architecture.md): per image ``{"scores": (K,), "labels":
int64 (K,) contiguous 0..7, "masks": bool (K, height, width)}``. They are kept as compressed RLE on
every rank, gathered onto rank 0, written there in the official submission format (one
``<image stem>_pred.txt`` per image with one ``<mask png> <labelId> <score>`` line per instance,
one binary PNG per instance) to a temporary folder, and scored by cityscapesscripts'
``evalInstanceLevelSemanticLabeling.evaluateImgLists`` against the ``_gtFine_instanceIds.png``
files, as Detectron2's ``CityscapesInstanceEvaluator`` does. NumPy >= 2.4 is handled by
:mod:`instseg.evaluation.cityscapes_compat`.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from instseg.utils import comm

from .cityscapes_compat import patched_instance_evaluation, patched_pixel_evaluation, write_dict_to_json
from .evaluator import DatasetEvaluator

__all__ = ["CityscapesInstanceEvaluator", "CityscapesSemSegEvaluator", "cityscapes_gt_file"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_gt_file(image_file: str, gt_dir: str) -> str:
    """``gt_dir/<city>/<stem>_gtFine_instanceIds.png`` of ``.../<city>/<stem>_leftImg8bit.png``.

    Raises:
        ValueError: the file name does not end with ``_leftImg8bit.png``.
    """
    base = os.path.basename(image_file)
    if not base.endswith(_IMAGE_SUFFIX):
        raise ValueError(f"{image_file}: not a Cityscapes image name (<city>_<seq>_<frame>{_IMAGE_SUFFIX})")
    city = os.path.basename(os.path.dirname(os.path.abspath(image_file)))
    return os.path.join(os.path.abspath(gt_dir), city, base[: -len(_IMAGE_SUFFIX)] + _INSTANCE_SUFFIX)


class CityscapesInstanceEvaluator(DatasetEvaluator):
    """Cityscapes instance AP and AP50 (percent) and per-class AP, by cityscapesscripts.

    Usage: ``reset()``, ``process(inputs, outputs)`` per batch on every DDP rank, ``evaluate()``
    on every rank (it gathers; rank 0 evaluates and returns the metrics, the others ``{}``). Only
    the processed images are scored (a subset of the split can be evaluated); an image seen twice
    (a ``DistributedSampler``'s padding) counts once.

    Args:
        dataset_name: a dataset registered with
            :func:`instseg.data.register_cityscapes_instances` (its metadata gives ``gt_dir`` and
            ``thing_classes``). Or give ``gt_dir`` (and optionally ``thing_classes``) directly.
        gt_dir: the ``gtFine/<split>`` folder (city folders with ``_gtFine_instanceIds.png``).
        thing_classes: name of each contiguous label; must be cityscapesscripts label names
            (default: the 8 instance classes in cityscapesscripts' order).
        output_dir: when given, rank 0 writes ``metrics.json`` there (NaN as ``null``).
        max_dets_per_image: ``TEST.DETECTIONS_PER_IMAGE``: the highest-scoring predictions per image
            that are submitted.
        submission_dir: keep the submission (txt files and mask PNGs) in this folder instead of a
            temporary one that is deleted after the evaluation.

    Raises:
        ValueError: neither a dataset with ``gt_dir`` nor ``gt_dir``; a class name that
            cityscapesscripts does not know.
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        *,
        gt_dir: Optional[str] = None,
        thing_classes: Optional[Sequence[str]] = None,
        output_dir: Optional[str] = None,
        max_dets_per_image: int = 100,
        submission_dir: Optional[str] = None,
    ):
        from cityscapesscripts.helpers.labels import name2label

        if dataset_name is not None:
            from instseg.data import MetadataCatalog

            meta = MetadataCatalog.get(dataset_name)
            gt_dir = gt_dir or getattr(meta, "gt_dir", None)
            if thing_classes is None and meta.has("thing_classes"):
                thing_classes = meta.thing_classes
        if not gt_dir:
            raise ValueError(
                f"CityscapesInstanceEvaluator: no gt_dir (dataset {dataset_name!r} has no 'gt_dir' metadata; "
                "register it with register_cityscapes_instances(name, image_dir, gt_dir))")
        if thing_classes is None:
            from instseg.data.cityscapes import cityscapes_instance_metadata

            thing_classes = cityscapes_instance_metadata()["thing_classes"]
        unknown = [c for c in thing_classes if c not in name2label]
        if unknown:
            raise ValueError(f"CityscapesInstanceEvaluator: classes {unknown} are not cityscapesscripts labels")
        self._gt_dir = os.path.abspath(gt_dir)
        self._thing_classes = list(thing_classes)
        self._label_ids = [int(name2label[c].id) for c in self._thing_classes]
        self._output_dir = output_dir
        self._submission_dir = submission_dir
        self._max_dets = int(max_dets_per_image)
        if self._max_dets < 1:
            raise ValueError(f"max_dets_per_image must be >= 1, got {max_dets_per_image}")
        self._gt_cache: Dict[str, Any] = {}  # gt png -> instances2dict entry, kept across evaluations
        self.reset()

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._predictions: List[Dict[str, Any]] = []

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Keep one batch of predictions (compressed RLE masks, Cityscapes label ids, scores).

        Args:
            inputs: model input dicts with ``"file_name"`` (a ``_leftImg8bit.png``) and, when
                present, ``"height"``/``"width"`` (checked against the masks).
            outputs: one dict per input with ``"scores"``, ``"labels"``, ``"masks"`` (bool, at the
                original size); ``{"instances": {...}}`` is accepted too.

        Raises:
            ValueError: ``len(inputs) != len(outputs)``, masks not bool or not at (height, width),
                a label outside ``0..len(thing_classes)-1``, or a file name that is not Cityscapes'.
        """
        from pycocotools import mask as mask_util

        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "instances" in out and isinstance(out["instances"], dict):
                out = out["instances"]
            file_name = inp["file_name"]
            gt_file = cityscapes_gt_file(file_name, self._gt_dir)
            scores = torch.as_tensor(out["scores"]).detach().float().cpu().reshape(-1)
            labels = torch.as_tensor(out["labels"]).detach().cpu().reshape(-1).long()
            masks = torch.as_tensor(out["masks"]).detach().cpu()
            if masks.dtype != torch.bool:
                raise ValueError(f"{file_name}: masks must be bool (thresholded), got {masks.dtype}")
            if len(labels) != len(scores) or masks.shape[0] != len(scores):
                raise ValueError(f"{file_name}: {len(scores)} scores, {len(labels)} labels, {masks.shape[0]} masks")
            if "height" in inp and "width" in inp and masks.shape[0] > 0:
                expected = (int(inp["height"]), int(inp["width"]))
                if tuple(masks.shape[-2:]) != expected:
                    raise ValueError(f"{file_name}: masks are {tuple(masks.shape[-2:])}, expected the original "
                                     f"size {expected} (data contract: outputs at height x width)")
            if len(scores) > self._max_dets:
                top = scores.topk(self._max_dets).indices
                scores, labels, masks = scores[top], labels[top], masks[top]
            bad = [int(v) for v in labels if not 0 <= int(v) < len(self._label_ids)]
            if bad:
                raise ValueError(f"{file_name}: labels {sorted(set(bad))} outside 0..{len(self._label_ids) - 1}")
            instances = []
            if len(scores):
                arr = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
                for k, rle in enumerate(mask_util.encode(arr)):
                    instances.append((int(labels[k]), float(scores[k]), rle))
            self._predictions.append({"file_name": file_name, "gt_file": gt_file,
                                      "height": int(masks.shape[-2]), "width": int(masks.shape[-1]),
                                      "instances": instances})

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Gather the predictions onto rank 0, write the submission and run cityscapesscripts.

        Returns:
            On rank 0: ``{"segm": {"AP", "AP50", "AP-<class>"..., "AP50-<class>"...}}``, percent
            (0-100), NaN for a class without ground truth in the evaluated images; ``{}`` on other
            ranks, and ``{}`` (with a warning) when no image was processed.

        Raises:
            FileNotFoundError: the ``_gtFine_instanceIds.png`` of a processed image is missing.
            RuntimeError: cityscapesscripts stopped with an error (it calls ``sys.exit``).
        """
        predictions = comm.gather_lists_to_main(self._predictions)
        if predictions is None:  # not the main process
            return {}
        if not predictions:
            logger.warning("CityscapesInstanceEvaluator: no image was processed; nothing to evaluate")
            return {}
        by_gt: Dict[str, Dict[str, Any]] = {}
        for p in predictions:  # first occurrence wins
            by_gt.setdefault(p["gt_file"], p)
        missing = [g for g in by_gt if not os.path.isfile(g)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ground-truth files not found, e.g. {missing[0]} "
                                    f"(for {by_gt[missing[0]]['file_name']})")

        if self._submission_dir:
            os.makedirs(self._submission_dir, exist_ok=True)
            metrics = self._run(by_gt, os.path.abspath(self._submission_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as tmp:
                metrics = self._run(by_gt, tmp)
        results = OrderedDict(segm=metrics)
        if self._output_dir:
            from .coco_evaluation import _nan_to_none

            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "metrics.json"), "w") as f:
                json.dump(_nan_to_none(results), f, indent=2)
        return results

    # ------------------------------------------------------------- internals
    def _write_submission(self, by_gt: Dict[str, Dict[str, Any]], folder: str) -> List[str]:
        from PIL import Image
        from pycocotools import mask as mask_util

        pred_files = []
        for gt_file in sorted(by_gt):
            p = by_gt[gt_file]
            stem = os.path.basename(p["file_name"])[: -len(_IMAGE_SUFFIX)]
            txt = os.path.join(folder, stem + "_pred.txt")
            lines = []
            for k, (label, score, rle) in enumerate(p["instances"]):
                mask = mask_util.decode(rle)
                if not mask.any():
                    continue  # cityscapesscripts skips empty masks; no need to write them
                png = f"{stem}_{k}_{self._thing_classes[label]}.png"
                Image.fromarray(mask * np.uint8(255)).save(os.path.join(folder, png), compress_level=1)
                lines.append(f"{png} {self._label_ids[label]} {score!r}\n")
            with open(txt, "w") as f:
                f.writelines(lines)
            pred_files.append(txt)
        return pred_files

    def _run(self, by_gt: Dict[str, Dict[str, Any]], folder: str) -> Dict[str, float]:
        from cityscapesscripts.evaluation.instances2dict import instances2dict

        gt_files = sorted(by_gt)
        logger.info("Writing the Cityscapes submission of %d images to %s", len(gt_files), folder)
        pred_files = self._write_submission(by_gt, folder)
        todo = [g for g in gt_files if g not in self._gt_cache]
        if todo:
            self._gt_cache.update(instances2dict(todo, False))
        gt_json = os.path.join(folder, "gtInstances.json")
        write_dict_to_json({g: self._gt_cache[g] for g in gt_files}, gt_json)

        with patched_instance_evaluation(folder) as cs_eval:
            args = copy.copy(cs_eval.args)
            args.predictionPath = os.path.abspath(folder)
            args.predictionWalk = None
            args.gtInstancesFile = gt_json
            args.exportFile = os.path.join(folder, "resultInstanceLevelSemanticLabeling.json")
            args.JSONOutput = False
            args.colorized = False
            args.quiet = True
            args.csv = False
            logger.info("Evaluating %d images with cityscapesscripts' evalInstanceLevelSemanticLabeling", len(gt_files))
            try:
                res = cs_eval.evaluateImgLists(pred_files, gt_files, args)
            except SystemExit as e:  # cityscapesscripts' printError
                raise RuntimeError(f"cityscapesscripts' evaluation stopped (exit code {e.code}); its message is "
                                   "printed above") from None
        avg = res["averages"]
        metrics: Dict[str, float] = OrderedDict(AP=_pct(avg["allAp"]), AP50=_pct(avg["allAp50%"]))
        # the classes cityscapesscripts scores (its 8 instance classes); a panoptic dataset's
        # thing_classes list all 19 train classes (Detectron2's convention), stuff ones are not scored
        scored = [n for n in self._thing_classes if n in avg["classes"]]
        for name in scored:
            metrics[f"AP-{name}"] = _pct(avg["classes"][name]["ap"])
        for name in scored:
            metrics[f"AP50-{name}"] = _pct(avg["classes"][name]["ap50%"])
        self._log_table(metrics)
        return metrics

    def _log_table(self, metrics: Dict[str, float]) -> None:
        from .coco_evaluation import _format_table

        logger.info("Cityscapes instance segmentation (cityscapesscripts), %s:\n%s", self._gt_dir,
                    _format_table([[f"{metrics['AP']:.3f}", f"{metrics['AP50']:.3f}"]], ["AP", "AP50"]))
        rows = [[n, f"{metrics[f'AP-{n}']:.3f}", f"{metrics[f'AP50-{n}']:.3f}"] for n in self._thing_classes if f'AP-{n}' in metrics]
        logger.info("Per-class Cityscapes AP:\n%s", _format_table(rows, ["class", "AP", "AP50"]))


def _pct(v: Any) -> float:
    v = float(v)
    return v * 100.0 if not math.isnan(v) else float("nan")


class CityscapesSemSegEvaluator(DatasetEvaluator):
    """Cityscapes semantic segmentation scored by cityscapesscripts' ``evalPixelLevelSemanticLabeling``
    (as Detectron2's ``CityscapesSemSegEvaluator``): class IoU and iIoU averages, category IoU and
    iIoU, per-class IoU (percent).

    The prediction (argmax of the output's ``"sem_seg"`` over the 19 train classes) is converted to
    Cityscapes label ids (cityscapesscripts' ``trainId2label``), written as PNGs to a temporary folder
    and evaluated against the ``_gtFine_labelIds.png`` (and, for iIoU, ``_gtFine_instanceIds.png``)
    next to the input's ``"sem_seg_file_name"`` (``..._gtFine_labelTrainIds.png``) or found in
    ``gt_dir``. The library counts a class without ground-truth pixels but with predictions as IoU
    0 (:class:`SemSegEvaluator`, Detectron2's definition, leaves it out); on the 500 val images every
    class has ground truth and the two mIoUs agree.

    Args:
        dataset_name: a registered Cityscapes semantic / panoptic dataset (its metadata's
            ``gt_dir`` is used when an input has no ``sem_seg_file_name``).
        gt_dir: ``gtFine/<split>`` directly instead.
        output_dir: when given, rank 0 writes ``cityscapes_sem_seg_metrics.json`` there.

    Returns of ``evaluate()`` (rank 0): ``{"sem_seg": {"mIoU", "iIoU", "mIoU_category",
    "iIoU_category", "IoU-<class>"...}}``.

    Raises:
        ValueError: no ground-truth location (neither ``gt_dir`` nor metadata).
    """

    def __init__(self, dataset_name: Optional[str] = None, *, gt_dir: Optional[str] = None,
                 output_dir: Optional[str] = None):
        if dataset_name is not None and gt_dir is None:
            from instseg.data import MetadataCatalog

            gt_dir = MetadataCatalog.get(dataset_name).get("gt_dir")
        self._gt_dir = gt_dir
        self._output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        self._predictions: List[tuple] = []  # (gt labelIds png, PNG bytes of the prediction)

    def _gt_file(self, inp: Dict) -> str:
        sem = inp.get("sem_seg_file_name")
        if sem and sem.endswith("_gtFine_labelTrainIds.png"):
            return sem[: -len("_labelTrainIds.png")] + "_labelIds.png"
        if not self._gt_dir:
            raise ValueError(f"{inp.get('file_name')}: no sem_seg_file_name and no gt_dir to find its _gtFine_labelIds.png")
        return cityscapes_gt_file(inp["file_name"], self._gt_dir).replace("_instanceIds.png", "_labelIds.png")

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """Keep one batch of predictions as label-id PNGs.

        Raises:
            ValueError: ``len(inputs) != len(outputs)``; an output without ``"sem_seg"``
                ``(19, H, W)``.
        """
        import io

        from cityscapesscripts.helpers.labels import trainId2label
        from PIL import Image

        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        lut = np.zeros(256, dtype=np.uint8)
        for train_id, lab in trainId2label.items():
            if 0 <= train_id < 255:
                lut[train_id] = lab.id
        for inp, out in zip(inputs, outputs):
            sem = out.get("sem_seg")
            if sem is None or sem.dim() != 3 or sem.shape[0] != 19:
                raise ValueError(f"{inp.get('file_name')}: the output needs 'sem_seg' (19, H, W) over the Cityscapes "
                                 f"train classes, got {None if sem is None else tuple(sem.shape)}")
            pred = lut[sem.argmax(0).cpu().numpy().astype(np.int64)]
            buf = io.BytesIO()
            Image.fromarray(pred).save(buf, format="PNG", compress_level=1)
            self._predictions.append((self._gt_file(inp), buf.getvalue()))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Gather the predictions on rank 0 and run ``evaluateImgLists`` (other ranks: ``{}``).
        Raises RuntimeError when the library stops (its message is printed above)."""
        import copy
        import tempfile

        preds = comm.gather_lists_to_main(self._predictions)
        if not comm.is_main_process():
            return {}
        by_gt = dict(preds)  # an image seen twice counts once
        if not by_gt:
            logger.warning("CityscapesSemSegEvaluator: no predictions")
            return {}
        with tempfile.TemporaryDirectory() as tmp, patched_pixel_evaluation(tmp) as cs_eval:
            pred_files, gt_files = [], []
            for i, (gt, png) in enumerate(sorted(by_gt.items())):
                f = os.path.join(tmp, f"{i:06d}_pred.png")
                with open(f, "wb") as fh:
                    fh.write(png)
                pred_files.append(f)
                gt_files.append(gt)
            args = copy.copy(cs_eval.args)
            args.quiet, args.colorized, args.JSONOutput = True, False, False
            args.bold = args.nocol = ""
            args.evalInstLevelScore = all(os.path.isfile(g.replace("labelIds", "instanceIds")) for g in gt_files)
            args.evalPixelAccuracy = False
            try:
                res = cs_eval.evaluateImgLists(pred_files, gt_files, args)
            except SystemExit as e:
                raise RuntimeError(f"cityscapesscripts' evaluation stopped (exit code {e.code}); its message is "
                                   "printed above") from None
        metrics: Dict[str, float] = OrderedDict(
            mIoU=_pct(res["averageScoreClasses"]), iIoU=_pct(res["averageScoreInstClasses"]),
            mIoU_category=_pct(res["averageScoreCategories"]), iIoU_category=_pct(res["averageScoreInstCategories"]))
        for name, v in res["classScores"].items():
            if not math.isnan(float(v)):
                metrics[f"IoU-{name}"] = _pct(v)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_dict_to_json(dict(metrics), os.path.join(self._output_dir, "cityscapes_sem_seg_metrics.json"))
        logger.info("Cityscapes semantic segmentation (cityscapesscripts): mIoU %.2f, iIoU %.2f, category mIoU %.2f",
                    metrics["mIoU"], metrics["iIoU"], metrics["mIoU_category"])
        return {"sem_seg": metrics}
