"""Matching code shared by the models: Hungarian assignment and the box cost (QueryInst, FASSST).

Each model's own matcher lives in its package (``sparseinst.matcher.DiceScoreMatcher``,
``fastinst.matcher.MaskLocationMatcher``, ``queryinst.matcher.BoxSetMatcher``).
"""
from .box_cost import box_cost_matrix
from .hungarian import NonFiniteCostError, batched_hungarian_assign, hungarian_assign

__all__ = ["box_cost_matrix", "NonFiniteCostError", "batched_hungarian_assign", "hungarian_assign"]
