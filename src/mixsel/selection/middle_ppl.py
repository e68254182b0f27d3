"""Middle Perplexity (Marion et al., 2023, "When less is more: investigating data pruning for
pretraining LLMs at scale"), adapted to online selection as in CoLM (Table 1 "MP").

Marion et al. keep the middle percentile band of the perplexity distribution. Here the k
candidates whose perplexity *percentile* is closest to ``quantile`` (0.5: the median) are picked,
i.e. a contiguous band of the sorted perplexities centred on the median. Ranking by percentile
makes the choice invariant to monotone transforms (perplexity or loss give the same band).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.selection.base import Pool
from mixsel.selection.ranked import RankedSelector

__all__ = ["MiddlePerplexitySelector", "percentile_ranks"]


def percentile_ranks(values: torch.Tensor) -> torch.Tensor:
    """Percentile rank in [0, 1] of each value (stable: equal values ranked by index).

    r_i = position of i in the ascending stable sort / (n - 1); 0.5 for a single value.
    """
    values = values.reshape(-1).to(torch.float64)
    n = values.numel()
    order = torch.sort(values, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    return ranks / (n - 1) if n > 1 else torch.full((n,), 0.5, dtype=torch.float64)


@register_selector("middle_ppl")
class MiddlePerplexitySelector(RankedSelector):
    """Pick the k perplexities nearest the ``quantile`` of the pool: score_i = -|r_i - quantile|.

    With ``per_domain_budgets=True`` the percentiles are computed within each domain (domains have
    different perplexity scales) and each domain contributes its budget.

    Args:
        quantile: centre of the band, in [0, 1] (0.5 = median).
        per_domain_budgets, budget, shares, minimum, rounding: see
            :class:`mixsel.selection.ranked.RankedSelector`.
    """

    name = "middle_ppl"
    requires = frozenset({"perplexity"})

    def __init__(
        self,
        quantile: float = 0.5,
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
    ) -> None:
        super().__init__(
            per_domain_budgets=per_domain_budgets, budget=budget, shares=shares, minimum=minimum, rounding=rounding
        )
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"quantile={quantile} must lie in [0, 1] (0.5 = the median perplexity)")
        self.quantile = float(quantile)

    def score(self, pool: Pool) -> torch.Tensor:
        ppl = pool.feature("perplexity").reshape(-1)
        if not self.budgets.enabled:
            return -(percentile_ranks(ppl) - self.quantile).abs()
        scores = torch.empty(ppl.numel(), dtype=torch.float64)
        for d in range(pool.num_domains):
            members = torch.nonzero(pool.domains == d).flatten()
            if members.numel():
                scores[members] = -(percentile_ranks(ppl[members]) - self.quantile).abs()
        return scores
