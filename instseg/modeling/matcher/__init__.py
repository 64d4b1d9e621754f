"""Hungarian matchers shared by the models."""
from .box_matcher import BoxSetMatcher, box_cost_matrix
from .dice_matcher import DiceScoreMatcher
from .hungarian import NonFiniteCostError, batched_hungarian_assign, hungarian_assign
from .mask_matcher import MaskLocationMatcher

__all__ = ["BoxSetMatcher", "DiceScoreMatcher", "box_cost_matrix", "NonFiniteCostError", "batched_hungarian_assign", "hungarian_assign", "MaskLocationMatcher"]
