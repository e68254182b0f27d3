"""Least Confidence (uncertainty sampling; CoLM, Nguyen et al., ICLR 2025, Table 1 "LC").

Train on the k candidates whose target tokens the model is least sure about: the lowest mean
probability of the target tokens (feature ``confidence``).
"""

from __future__ import annotations

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool
from mixsel.selection.ranked import RankedSelector

__all__ = ["LeastConfidenceSelector"]


@register_selector("least_confidence")
class LeastConfidenceSelector(RankedSelector):
    """Pick the k lowest mean token confidences: score_i = -confidence_i (ties: lowest index).

    Args: see :class:`mixsel.selection.ranked.RankedSelector`.
    """

    name = "least_confidence"
    requires = frozenset({"confidence"})

    def score(self, pool: Pool) -> torch.Tensor:
        return -pool.feature("confidence").reshape(-1).to(torch.float64)
