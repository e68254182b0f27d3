"""Grad Norm (Katharopoulos & Fleuret, 2018, "Not all samples are created equal").

Importance-sampling baseline adapted to online selection as in CoLM (Nguyen et al., ICLR 2025,
Table 1 "GN"): train on the k candidates with the largest per-example gradient norm
(feature ``grad_norm``, the norm of the per-example gradient features).
"""

from __future__ import annotations

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool
from mixsel.selection.ranked import RankedSelector

__all__ = ["GradNormSelector"]


@register_selector("grad_norm")
class GradNormSelector(RankedSelector):
    """Pick the k largest gradient norms: score_i = ||g_i|| (ties: lowest index).

    Args: see :class:`mixsel.selection.ranked.RankedSelector`.
    """

    name = "grad_norm"
    requires = frozenset({"grad_norm"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.feature("grad_norm").reshape(-1)
