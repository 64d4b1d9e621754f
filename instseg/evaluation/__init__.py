"""Evaluation: COCO AP (:class:`COCOEvaluator`), Cityscapes AP (:class:`CityscapesInstanceEvaluator`,
cityscapesscripts), the inference loop and the timing harness."""
from .cityscapes_evaluation import CityscapesInstanceEvaluator
from .coco_evaluation import COCOEvaluator, fast_eval_available, instances_to_coco_json
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from .timing import benchmark_model, count_flops, count_parameters

__all__ = [
    "COCOEvaluator",
    "CityscapesInstanceEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "benchmark_model",
    "count_flops",
    "count_parameters",
    "fast_eval_available",
    "inference_on_dataset",
    "instances_to_coco_json",
]
