"""Dice-based matching score of SparseInst (Eq. 1): ``C(i,k) = p_{i,c_k}^{1-alpha} DICE(m_i,t_k)^alpha``."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from instseg.modeling.losses import dice_coefficient_matrix
from instseg.modeling.matcher import hungarian_assign

__all__ = ["DiceScoreMatcher"]


class DiceScoreMatcher(nn.Module):
    """Hungarian matching that *maximizes* ``dice^alpha * prob^beta`` (SparseInst Sec. 3.5, Eq. 1).

    The paper writes ``beta = 1 - alpha``; the official code exposes both (alpha 0.8, beta 0.2).
    Dice uses the squared denominator with ``eps = 1e-4`` (Eq. 2, official ``dice_score``).
    Everything is computed in float32 with autocast disabled, so fp16 training cannot put NaN or
    Inf into the cost matrix through overflow.
    """

    def __init__(self, alpha: float = 0.8, beta: float = 0.2):
        super().__init__()
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"alpha and beta must lie in [0, 1], got {alpha}, {beta}")
        self.alpha = alpha
        self.beta = beta

    @torch.no_grad()
    def score_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, tgt_labels: torch.Tensor, tgt_masks: torch.Tensor) -> torch.Tensor:
        """``(N, M)`` matching scores for one image.

        Args:
            pred_logits: ``(N, K)`` class logits.
            pred_masks: ``(N, h, w)`` mask logits.
            tgt_labels: ``(M,)`` int64 classes.
            tgt_masks: ``(M, h, w)`` targets in [0, 1] at the prediction's resolution.
        """
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            dice = dice_coefficient_matrix(pred_masks.flatten(1), tgt_masks.flatten(1))
            prob = pred_logits.float().sigmoid()[:, tgt_labels]
            # clamp: 0^0.2 is fine, but a tiny negative from rounding would give NaN under pow
            return dice.clamp(min=0) ** self.alpha * prob.clamp(min=0) ** self.beta

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits`` ``(B, N, K)``, ``pred_masks`` ``(B, N, h, w)``.
            targets: per image ``labels`` ``(M_b,)`` and ``masks`` ``(M_b, h, w)`` (float, already
                resized to the prediction size).
        Returns:
            per image ``(pred_idx, tgt_idx)`` int64 tensors of length ``min(N, M_b)``.
        """
        indices = []
        for b, tgt in enumerate(targets):
            if tgt["labels"].numel() == 0:
                e = torch.empty(0, dtype=torch.int64)
                indices.append((e, e.clone()))
                continue
            score = self.score_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], tgt["labels"], tgt["masks"])
            indices.append(hungarian_assign(score, maximize=True, name="dice-score matrix"))
        return indices
