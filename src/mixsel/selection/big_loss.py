"""Big Loss (Jiang et al., 2019, "Accelerating deep learning by focusing on the biggest losers").

Online baseline: train on the k candidates with the largest current per-example loss
(mean token cross-entropy over the target tokens, feature ``loss``).
"""

from __future__ import annotations

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool
from mixsel.selection.ranked import RankedSelector

__all__ = ["BigLossSelector"]


@register_selector("big_loss")
class BigLossSelector(RankedSelector):
    """Pick the k largest per-example losses: score_i = loss_i (ties: lowest index).

    Args: see :class:`mixsel.selection.ranked.RankedSelector` (``per_domain_budgets``,
    ``budget``, ``shares``, ``minimum``).
    """

    name = "big_loss"
    requires = frozenset({"loss"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.feature("loss").reshape(-1)
