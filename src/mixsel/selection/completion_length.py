"""Completion Length (Zhao et al., 2024, "Long is more for alignment").

One-shot heuristic adapted to online selection as in CoLM (Table 1 "CL"): train on the k
candidates with the most target (completion) tokens (feature ``completion_length``).
"""

from __future__ import annotations

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool
from mixsel.selection.ranked import RankedSelector

__all__ = ["CompletionLengthSelector"]


@register_selector("completion_length")
class CompletionLengthSelector(RankedSelector):
    """Pick the k longest completions: score_i = number of target tokens (ties: lowest index).

    Args: see :class:`mixsel.selection.ranked.RankedSelector`.
    """

    name = "completion_length"
    requires = frozenset({"completion_length"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.feature("completion_length").reshape(-1).to(torch.float64)
