"""Lightning module and data module around any registered meta-architecture."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Dict, List

import lightning as L
import torch

from ..modeling import build_model
from ..modeling.matcher import NonFiniteCostError
from .optim import build_lr_lambda, build_optimizer, clip_gradients

if TYPE_CHECKING:
    from ..evaluation import DatasetEvaluator

__all__ = ["InstSegModule", "InstSegDataModule", "check_finite_losses", "dataset_output_dir"]

logger = logging.getLogger(__name__)


def check_finite_losses(losses: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise :class:`FloatingPointError` naming the iteration and the first non-finite loss term
    (with every term's value), instead of letting NaN weights propagate silently."""
    for name, value in losses.items():
        if not bool(torch.isfinite(value.detach()).all()):
            terms = {k: float(v.detach()) for k, v in losses.items()}
            raise FloatingPointError(
                f"Loss became non-finite at iteration {iteration}: {name} = {float(value.detach())} (all terms: {terms})"
            )


def dataset_output_dir(output_dir: str, dataset_name: str) -> str:
    """``output_dir/inference/<dataset_name>``: where the evaluation of one test dataset writes
    ``coco_instances_results.json`` and ``metrics.json`` (path separators in the name become ``_``)."""
    safe = dataset_name.replace(os.sep, "_").replace("/", "_")
    return os.path.join(output_dir, "inference", safe)


def _coco_evaluator(cfg, meta, out_dir, per_category: bool):
    """:class:`COCOEvaluator` on a dataset's ``json_file`` (contiguous ids mapped back by its metadata)."""
    from ..evaluation import COCOEvaluator

    mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    inv = {v: k for k, v in mapping.items()} if mapping else None
    return COCOEvaluator(meta.json_file, output_dir=out_dir, contiguous_to_dataset_id=inv,
                         per_category=per_category, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                         backend=cfg.TEST.COCO_EVAL_BACKEND)


class InstSegModule(L.LightningModule):
    """Trains ``build_model(cfg)`` (the model returns a dict of weighted losses in training mode)
    and evaluates it with the COCO evaluator on every dataset of ``DATASETS.TEST``.

    Evaluation: validation dataloader ``i`` is ``DATASETS.TEST[i]``. One :class:`COCOEvaluator`
    per test dataset is built at the first validation (the json is read once) and ``reset()`` at
    the start of each one. After a validation, :attr:`eval_results` is
    ``{dataset_name: {"segm": {...}, "bbox": {...}}}`` (rank 0; ``{}`` on the other ranks), the
    metrics are logged as ``<dataset_name>/<task>/<metric>`` (e.g. ``coco_2017_val/segm/AP``), each
    dataset's predictions and metrics are written to ``OUTPUT_DIR/inference/<dataset_name>/``
    (``coco_instances_results.json``, ``metrics.json``) and all datasets' metrics to
    ``OUTPUT_DIR/metrics.json`` (same structure as :attr:`eval_results`, NaN as ``null``).

    ``train/<loss term>`` and ``train/total_loss`` are logged every step; under DDP, on the steps
    that the text log, csv and TensorBoard write (:meth:`is_log_step`), they are the mean over the
    ranks (one ``all_reduce`` per ``LOG_PERIOD``; the gradients are untouched).

    ``train/lr`` logs the base LR, ``SOLVER.BASE_LR`` times the schedule's current multiplier (the
    backbone's LR is that times ``SOLVER.BACKBONE_MULTIPLIER``). Gradients are clipped as
    ``SOLVER.CLIP_GRADIENTS`` says (:func:`instseg.engine.optim.clip_gradients`).

    A NaN/Inf loss term or matching cost stops the run with :class:`FloatingPointError` naming the
    iteration and the term.

    Args:
        cfg: the config (``TEST.COCO_EVAL_BACKEND`` picks the COCO evaluator's COCOeval).
        per_category: the evaluators also report ``"AP-<category name>"`` per task.

    Raises:
        ValueError: ``TEST.COCO_EVAL_BACKEND`` is not one of ``instseg.evaluation.COCO_EVAL_BACKENDS``.
    """

    def __init__(self, cfg, per_category: bool = False):
        super().__init__()
        from ..evaluation import check_coco_eval_backend

        check_coco_eval_backend(cfg.TEST.COCO_EVAL_BACKEND)  # before training, not at the first evaluation
        self.cfg = cfg
        self.per_category = bool(per_category)
        self.model = build_model(cfg)
        self._evaluators: Dict[str, "DatasetEvaluator"] = {}
        self._eval_results: Dict = {}

    def forward(self, batched_inputs: List[Dict]):
        return self.model(batched_inputs)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: List[Dict], batch_idx: int):
        it = self.global_step
        try:
            losses = self.model(batch)
        except NonFiniteCostError as e:
            raise FloatingPointError(f"iteration {it}: {e}") from e
        check_finite_losses(losses, it)
        total = sum(losses.values())
        bs = len(batch)
        logged = self._losses_to_log(losses, total)  # the mean over the ranks on log steps
        total_logged = logged.pop("total_loss")
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, batch_size=bs, sync_dist=False)
        self.log("train/total_loss", total_logged, prog_bar=True, batch_size=bs)
        self.log("train/lr", self.current_base_lr(), batch_size=bs)
        return total

    def is_log_step(self) -> bool:
        """Whether the current training step's values are written: the first iteration, every
        ``LOG_PERIOD``-th and the last (the text log), which include the Trainer's
        ``log_every_n_steps = LOG_PERIOD`` steps (the csv / TensorBoard loggers). The same on
        every rank (it depends on the step and the config only)."""
        step = self.global_step + 1  # 1-based number of the iteration being run
        period = max(1, int(self.cfg.LOG_PERIOD))
        max_iter, every_n = int(self.cfg.SOLVER.MAX_ITER), 0
        if self._trainer is not None:
            max_iter = int(self.trainer.max_steps) if self.trainer.max_steps > 0 else max_iter
            every_n = int(self.trainer.log_every_n_steps or 0)
        return step == 1 or step % period == 0 or step == max_iter or bool(every_n and step % every_n == 0)

    def _losses_to_log(self, losses: Dict[str, torch.Tensor], total: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss terms and ``"total_loss"`` to log, detached. Under DDP, on a log step
        (:meth:`is_log_step`), their mean over the ranks: one ``all_reduce`` (sum, then divided by
        the world size) of the stacked values, a copy that no gradient flows through, with no
        barrier and no host sync (Lightning's ``sync_dist=True`` would add a barrier and one
        ``all_reduce`` per key at every step). On the other steps (seen only by a progress bar
        refreshed every step) and in a single process: this rank's values."""
        names = list(losses)
        values = [losses[k].detach() for k in names] + [total.detach()]
        dist = torch.distributed
        if (
            self._trainer is not None
            and self.trainer.world_size > 1  # a DDP run of this Trainer (all ranks run this step)
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
            and self.is_log_step()
        ):
            stacked = torch.stack([v.float().reshape(()) for v in values])
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            values = list((stacked / dist.get_world_size()).unbind())
        out = dict(zip(names, values[:-1]))
        out["total_loss"] = values[-1]
        return out

    def current_base_lr(self) -> float:
        """``SOLVER.BASE_LR`` times the LR schedule's multiplier at the scheduler's current step
        (restored with the checkpoint on resume), i.e. the LR of the non-backbone parameters."""
        base = float(self.cfg.SOLVER.BASE_LR)
        if self._trainer is None:
            return base
        sched = self.lr_schedulers()
        if isinstance(sched, list):
            sched = sched[0]
        if sched is None:
            return base
        return base * float(sched.lr_lambdas[0](sched.last_epoch))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.cfg, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(self.cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self):
        """Set every group's LR to the schedule's value at the scheduler's (restored) step.

        On resume the optimizer's LRs come from the checkpoint, i.e. from the schedule of the run
        that wrote it; the schedule depends on ``SOLVER.MAX_ITER`` (the warm-up is capped at it), so
        a resume with a different ``MAX_ITER`` would otherwise run its first iteration at the old
        schedule's LR. Same config: the same values (a no-op)."""
        if self._trainer is None:
            return
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, lmbda in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * lmbda(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """``SOLVER.CLIP_GRADIENTS`` (``CLIP_TYPE``, ``CLIP_VALUE``, ``NORM_TYPE``) on the optimizer's
        parameters; the Trainer's own ``gradient_clip_val`` is not used (it knows only the 2-norm).
        Under AMP the gradients are already unscaled here."""
        clip_gradients((p for g in optimizer.param_groups for p in g["params"]), self.cfg.SOLVER.CLIP_GRADIENTS)

    # ------------------------------------------------------------------ evaluation
    @property
    def test_dataset_names(self) -> List[str]:
        return list(self.cfg.DATASETS.TEST)

    def _make_evaluator(self, name: str):
        """The dataset's evaluators, by its metadata's ``evaluator_type`` and the model's
        :attr:`~instseg.modeling.MetaArchBase.output_tasks` (as Detectron2's / Mask2Former's
        ``train_net.build_evaluator``):

        * ``"cityscapes_instance"`` -> :class:`CityscapesInstanceEvaluator` (cityscapesscripts);
        * ``"cityscapes_sem_seg"`` -> :class:`CityscapesSemSegEvaluator` (cityscapesscripts' mIoU,
          iIoU); ``"sem_seg"`` -> :class:`SemSegEvaluator` (Detectron2's mIoU);
        * ``"cityscapes_panoptic_seg"`` / ``"coco_panoptic_seg"`` -> :class:`PanopticEvaluator` (PQ)
          for ``"panoptic_seg"`` outputs, the semantic evaluator above for ``"sem_seg"`` outputs (when
          the dataset has semantic ground truth: Cityscapes, or ``sem_seg_root`` metadata), and for instance
          outputs :class:`CityscapesInstanceEvaluator` (Cityscapes) or :class:`COCOEvaluator` (when
          the metadata has a ``json_file`` with instances);
        * otherwise (``"coco"``) :class:`COCOEvaluator` on the dataset's ``json_file``.

        Raises:
            ValueError: the model produces none of the outputs the dataset is evaluated on (the
                message names the dataset, its type and the model's outputs).
        """
        from ..data import MetadataCatalog
        from ..evaluation import DatasetEvaluators

        meta = MetadataCatalog.get(name)
        etype = getattr(meta, "evaluator_type", None) or "coco"
        tasks = tuple(getattr(getattr(self, "model", None), "output_tasks", ("instances",)))
        out_dir = dataset_output_dir(self.cfg.OUTPUT_DIR, name)
        evaluators = []

        def sem_seg():
            if etype.startswith("cityscapes"):  # Mask2Former's train_net: cityscapesscripts' own evaluation
                from ..evaluation import CityscapesSemSegEvaluator

                return CityscapesSemSegEvaluator(name, output_dir=out_dir)
            from ..evaluation import SemSegEvaluator

            classes = list(meta.stuff_classes)
            return SemSegEvaluator(len(classes), classes, ignore_label=int(meta.get("ignore_label", 255)),
                                   output_dir=out_dir)

        if etype in ("cityscapes_sem_seg", "sem_seg"):
            if "sem_seg" in tasks:
                evaluators.append(sem_seg())
        elif etype in ("cityscapes_panoptic_seg", "coco_panoptic_seg"):
            if "panoptic_seg" in tasks:
                from ..evaluation import PanopticEvaluator

                contiguous = {**dict(meta.get("stuff_dataset_id_to_contiguous_id") or {}),
                              **dict(meta.get("thing_dataset_id_to_contiguous_id") or {})}
                by_contiguous = {int(c): int(d) for d, c in contiguous.items()}
                category_ids = [by_contiguous[c] for c in sorted(by_contiguous)] if by_contiguous else None
                evaluators.append(PanopticEvaluator(meta.panoptic_json, meta.panoptic_root,
                                                    category_ids=category_ids, output_dir=out_dir))
            # semantic ground truth: Cityscapes' labelTrainIds PNGs; COCO panoptic only when a
            # semantic folder was registered with it (Mask2Former's "sem_seg_root")
            if "sem_seg" in tasks and meta.has("stuff_classes") and (
                    etype == "cityscapes_panoptic_seg" or meta.has("sem_seg_root")):
                evaluators.append(sem_seg())
            if "instances" in tasks:
                if etype == "cityscapes_panoptic_seg" and meta.has("gt_dir"):
                    from ..evaluation import CityscapesInstanceEvaluator

                    evaluators.append(CityscapesInstanceEvaluator(
                        name, output_dir=out_dir, max_dets_per_image=self.cfg.TEST.DETECTIONS_PER_IMAGE))
                elif meta.has("json_file"):
                    evaluators.append(_coco_evaluator(self.cfg, meta, out_dir, self.per_category))
        elif "instances" in tasks:
            if etype == "cityscapes_instance":
                from ..evaluation import CityscapesInstanceEvaluator

                evaluators.append(CityscapesInstanceEvaluator(
                    name, output_dir=out_dir, max_dets_per_image=self.cfg.TEST.DETECTIONS_PER_IMAGE))
            else:
                evaluators.append(_coco_evaluator(self.cfg, meta, out_dir, self.per_category))
        if not evaluators:
            raise ValueError(
                f"test dataset {name!r} (evaluator_type {etype!r}) is not evaluated on any output of the model "
                f"(it outputs {list(tasks)}): switch the task on (e.g. MODEL.FASTINST.TEST.PANOPTIC_ON / "
                "SEMANTIC_ON / INSTANCE_ON) or test on a dataset of that task")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    def evaluator(self, name: str):
        """The evaluator of test dataset ``name``, built on first use and kept (COCO json read once)."""
        if name not in self._evaluators:
            self._evaluators[name] = self._make_evaluator(name)
        return self._evaluators[name]

    def on_validation_epoch_start(self):
        for name in self.test_dataset_names:
            self.evaluator(name).reset()

    def validation_step(self, batch: List[Dict], batch_idx: int, dataloader_idx: int = 0):
        outputs = self.model(batch)
        name = self.test_dataset_names[dataloader_idx]
        self.evaluator(name).process(
            batch, [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in o.items()} for o in outputs])

    def on_validation_epoch_end(self):
        results: Dict = {}
        for name in self.test_dataset_names:  # same order on every rank: evaluate() gathers
            res = self.evaluator(name).evaluate() or {}
            if res:
                results[name] = res
        self._eval_results = results
        flat = {}
        for name, res in results.items():
            for task, metrics in res.items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not math.isnan(v) and "-" not in k:
                        flat[f"{name}/{task}/{k}"] = float(v)
        if flat:
            # metrics exist only on rank 0; rank_zero_only logging avoids a cross-rank sync
            self.log_dict(flat, rank_zero_only=True, add_dataloader_idx=False)
        if results and self.cfg.OUTPUT_DIR:
            from ..evaluation.coco_evaluation import _nan_to_none

            os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), "w") as f:
                json.dump(_nan_to_none(results), f, indent=2)

    @property
    def eval_results(self) -> Dict:
        """``{dataset_name: {"segm": {...}, "bbox": {...}}}`` of the last validation (rank 0)."""
        return self._eval_results

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):  # pragma: no cover - alias
        return self.validation_step(batch, batch_idx, dataloader_idx)


class InstSegDataModule(L.LightningDataModule):
    """Training loader (infinite, aspect-ratio grouped, sharded per rank, resumable at the
    restored iteration) and one test loader per dataset of ``DATASETS.TEST``, in that order."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def _rank_world(self):
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def train_dataloader(self):
        from ..data import build_train_loader

        rank, world = self._rank_world()
        start_iter = self.trainer.global_step if self.trainer is not None else 0
        return build_train_loader(self.cfg, rank=rank, world_size=world, start_iter=start_iter)

    def val_dataloader(self):
        from ..data import build_test_loader

        rank, world = self._rank_world()
        return [build_test_loader(self.cfg, name, rank=rank, world_size=world) for name in self.cfg.DATASETS.TEST]
