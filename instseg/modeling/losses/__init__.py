"""Losses shared by the four models: dice, sigmoid focal, BCE, IoU/GIoU, objectness."""
from torch.nn.functional import binary_cross_entropy_with_logits
from torchvision.ops import generalized_box_iou_loss

from .dice import dice_coefficient_matrix, dice_loss
from .focal import focal_classification_loss, focal_cost_matrix, sigmoid_focal_loss
from .normalizer import num_instances_across_ranks
from .objectness import binarized_mask_iou
from .point_sample import calculate_uncertainty, point_sample, uncertain_point_coords_with_randomness

__all__ = [
    "binarized_mask_iou",
    "binary_cross_entropy_with_logits",
    "calculate_uncertainty",
    "dice_coefficient_matrix",
    "dice_loss",
    "focal_classification_loss",
    "focal_cost_matrix",
    "generalized_box_iou_loss",
    "num_instances_across_ranks",
    "point_sample",
    "sigmoid_focal_loss",
    "uncertain_point_coords_with_randomness",
]
