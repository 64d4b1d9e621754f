"""Losses shared by the models: dice, sigmoid focal, BCE, GIoU, the DETR normalizer and the
set-criterion helpers (matched predictions, targets and class targets).

Single-model pieces live in their packages (``sparseinst.objectness``, ``fastinst.point_sample``).
"""
from torch.nn.functional import binary_cross_entropy_with_logits
from torchvision.ops import generalized_box_iou_loss

from .dice import dice_coefficient_matrix, dice_loss
from .focal import focal_classification_loss, focal_cost_matrix, sigmoid_focal_loss
from .normalizer import num_instances_across_ranks
from .set_criterion import gather_matched_targets, matched_prediction_index, matched_target_classes

__all__ = [
    "binary_cross_entropy_with_logits",
    "dice_coefficient_matrix",
    "dice_loss",
    "focal_classification_loss",
    "focal_cost_matrix",
    "gather_matched_targets",
    "generalized_box_iou_loss",
    "matched_prediction_index",
    "matched_target_classes",
    "num_instances_across_ranks",
    "sigmoid_focal_loss",
]
