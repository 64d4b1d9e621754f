"""Lightning module and data module around any registered meta-architecture."""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import lightning as L
import torch

from ..modeling import build_model
from ..modeling.matcher import NonFiniteCostError
from .optim import build_lr_lambda, build_optimizer

__all__ = ["InstSegModule", "InstSegDataModule", "check_finite_losses"]

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


class InstSegModule(L.LightningModule):
    """Trains ``build_model(cfg)`` (the model returns a dict of weighted losses in training mode)
    and evaluates it with the COCO evaluator on ``DATASETS.TEST``.

    A NaN/Inf loss term or matching cost stops the run with :class:`FloatingPointError` naming the
    iteration and the term.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self._evaluator = None
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
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs, sync_dist=False)
        self.log("train/total_loss", total.detach(), prog_bar=True, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self.trainer is not None else 0.0, batch_size=bs)
        return total

    def configure_optimizers(self):
        optimizer = build_optimizer(self.cfg, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(self.cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ evaluation
    def _make_evaluator(self):
        from ..data import MetadataCatalog
        from ..evaluation import COCOEvaluator

        name = self.cfg.DATASETS.TEST[0]
        meta = MetadataCatalog.get(name)
        mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        inv = {v: k for k, v in mapping.items()} if mapping else None
        return COCOEvaluator(
            meta.json_file,
            output_dir=self.cfg.OUTPUT_DIR,
            contiguous_to_dataset_id=inv,
            per_category=getattr(self, "per_category", False),
            max_dets_per_image=self.cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    def on_validation_epoch_start(self):
        self._evaluator = self._make_evaluator()
        self._evaluator.reset()

    def validation_step(self, batch: List[Dict], batch_idx: int):
        outputs = self.model(batch)
        self._evaluator.process(batch, [{k: v.cpu() for k, v in o.items()} for o in outputs])

    def on_validation_epoch_end(self):
        results = self._evaluator.evaluate() or {}
        self._eval_results = results
        flat = {}
        for task, metrics in results.items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not math.isnan(v) and "-" not in k:
                    flat[f"{task}/{k}"] = float(v)
        if flat:
            # metrics exist only on rank 0; rank_zero_only logging avoids a cross-rank sync
            self.log_dict(flat, rank_zero_only=True)

    @property
    def eval_results(self) -> Dict:
        return self._eval_results

    def test_step(self, batch, batch_idx):  # pragma: no cover - alias
        return self.validation_step(batch, batch_idx)


class InstSegDataModule(L.LightningDataModule):
    """Training loader (infinite, aspect-ratio grouped, sharded per rank, resumable at the
    restored iteration) and test loader of ``DATASETS.TEST[0]``."""

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

        if not self.cfg.DATASETS.TEST:
            return []
        rank, world = self._rank_world()
        return build_test_loader(self.cfg, self.cfg.DATASETS.TEST[0], rank=rank, world_size=world)
