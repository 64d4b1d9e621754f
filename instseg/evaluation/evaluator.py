"""Evaluator interface and the inference loop (Detectron2's ``inference_on_dataset``)."""
from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from instseg.utils import comm

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Interface: ``reset()``, ``process(inputs, outputs)`` per batch, ``evaluate() -> dict``.

    ``evaluate`` returns ``{task: {metric: value}}`` on the main process (``{}`` elsewhere).
    """

    def reset(self) -> None:
        pass

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        pass

    def evaluate(self) -> Dict:
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Run several evaluators on the same predictions; their results are merged.

    Raises:
        KeyError: two evaluators return the same task name.
    """

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for e in self._evaluators:
            e.reset()

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for e in self._evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> Dict:
        results: Dict = OrderedDict()
        for e in self._evaluators:
            res = e.evaluate() or {}
            if comm.is_main_process():
                for k, v in res.items():
                    if k in results:
                        raise KeyError(f"Two evaluators returned the same task '{k}'")
                    results[k] = v
        return results


def _sync(model: nn.Module) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable[List[Dict]],
    evaluator: Optional[DatasetEvaluator],
    log_period_s: float = 5.0,
    num_warmup: int = 5,
) -> Dict:
    """Run ``model`` on every batch of ``data_loader`` and evaluate the outputs.

    The model is put in eval mode under ``torch.no_grad()`` and its training mode is restored
    afterwards (also on error). Under DDP each rank runs its own shard; ``evaluator.evaluate()``
    gathers them.

    Args:
        model: follows the data contract (docs/architecture.md): ``model(batch)`` with ``batch`` a list of input
            dicts returns one output dict per input.
        data_loader: iterable of batches (lists of input dicts); ``len()`` used for progress when
            available.
        evaluator: receives ``reset()``, ``process(batch, outputs)`` and ``evaluate()``; ``None``
            runs inference only and returns ``{}``.
        log_period_s: seconds between progress log lines.
        num_warmup: first iterations left out of the reported throughput.

    Returns:
        ``evaluator.evaluate()`` (``{}`` on non-main ranks or when it returns ``None``).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    world = comm.get_world_size()
    logger.info("Start inference on %s batches%s", total if total is not None else "?",
                f" per rank ({world} ranks)" if world > 1 else "")

    evaluator.reset()
    was_training = model.training
    model.eval()
    num_images = 0
    num_images_after_warmup = 0
    compute_time = 0.0  # model() only, after warm-up
    start = time.perf_counter()
    start_after_warmup = start
    last_log = start
    try:
        with torch.no_grad():
            for idx, batch in enumerate(data_loader):
                if idx == num_warmup:
                    start_after_warmup = time.perf_counter()
                    num_images_after_warmup = 0
                    compute_time = 0.0
                t0 = time.perf_counter()
                outputs = model(batch)
                _sync(model)
                compute_time += time.perf_counter() - t0
                evaluator.process(batch, outputs)
                num_images += len(batch)
                num_images_after_warmup += len(batch)

                now = time.perf_counter()
                if now - last_log >= log_period_s:
                    last_log = now
                    elapsed = now - start_after_warmup if idx >= num_warmup else now - start
                    ips = num_images_after_warmup / max(elapsed, 1e-9)
                    eta = ""
                    if total is not None and idx + 1 < total:
                        per_batch = elapsed / max(idx + 1 - (num_warmup if idx >= num_warmup else 0), 1)
                        eta = ", ETA " + str(datetime.timedelta(seconds=int(per_batch * (total - idx - 1))))
                    logger.info("Inference done %d/%s batches: %.2f images/s%s",
                                idx + 1, total if total is not None else "?", ips, eta)
    finally:
        model.train(was_training)

    total_time = time.perf_counter() - start
    logger.info(
        "Total inference time: %s for %d images on this rank (%.2f images/s overall; "
        "%.1f ms/image in model(), first %d batches excluded when there are more)",
        str(datetime.timedelta(seconds=int(total_time))), num_images,
        num_images / max(total_time, 1e-9),
        1000.0 * compute_time / max(num_images_after_warmup, 1), num_warmup,
    )
    results = evaluator.evaluate()
    return results if results is not None else {}
