"""Hungarian matchers shared by the models."""
from .dice_matcher import DiceScoreMatcher
from .hungarian import NonFiniteCostError, batched_hungarian_assign, hungarian_assign

__all__ = ["DiceScoreMatcher", "NonFiniteCostError", "batched_hungarian_assign", "hungarian_assign"]
