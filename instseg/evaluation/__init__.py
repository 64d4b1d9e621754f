"""Evaluation: COCO AP (:class:`COCOEvaluator`), Cityscapes AP (:class:`CityscapesInstanceEvaluator`,
cityscapesscripts), semantic mIoU (:class:`SemSegEvaluator`), panoptic PQ (:class:`PanopticEvaluator`,
cityscapesscripts), the inference loop and the timing harness."""
from .cityscapes_evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from .coco_evaluation import (
    COCO_EVAL_BACKENDS,
    DEFAULT_COCO_EVAL_BACKEND,
    COCOEvaluator,
    check_coco_eval_backend,
    coco_eval_backend_available,
    fast_eval_available,
    instances_to_coco_json,
)
from .panoptic_evaluation import PanopticEvaluator
from .sem_seg_evaluation import SemSegEvaluator, semseg_metrics
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from .timing import benchmark_model, count_flops, count_parameters

__all__ = [
    "COCO_EVAL_BACKENDS",
    "DEFAULT_COCO_EVAL_BACKEND",
    "COCOEvaluator",
    "check_coco_eval_backend",
    "coco_eval_backend_available",
    "CityscapesInstanceEvaluator",
    "CityscapesSemSegEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "PanopticEvaluator",
    "SemSegEvaluator",
    "benchmark_model",
    "count_flops",
    "count_parameters",
    "fast_eval_available",
    "inference_on_dataset",
    "instances_to_coco_json",
    "semseg_metrics",
]
