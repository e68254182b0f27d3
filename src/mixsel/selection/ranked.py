"""Score-ranking selection: the k best candidates, globally or within per-domain budgets.

:func:`ranked_pick` takes the k best-scored candidates (ties: lowest index), and
:class:`RankedSelector` wraps it into a selector whose subclasses only define a score (the
heuristic baselines ``big_loss``, ``grad_norm``, ``middle_ppl``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.types import Selection

__all__ = ["RankedSelector", "ranked_pick"]


def ranked_pick(
    scores: torch.Tensor,
    k: int,
    *,
    groups: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The k highest ``scores`` (ties: lowest index), optionally at most ``budgets[g]`` per group.

    Candidates are scanned in descending score order and accepted while their group has budget
    left, so with budgets the result is the top-k_d of every group, in global score order.

    Args:
        scores: Tensor[n], larger is better; must be finite.
        k: number to pick.
        groups: LongTensor[n] group ids (needed with ``budgets``).
        budgets: LongTensor[G] per-group maximum counts.

    Returns:
        LongTensor[k] indices in pick order.
    """
    scores = torch.as_tensor(scores).reshape(-1)
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the pool features")
    if k > scores.numel():
        raise ValueError(f"k={k} is larger than the {scores.numel()} candidates")
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    if budgets is None:
        return order[:k]
    if groups is None:
        raise ValueError("ranked_pick with budgets needs groups (the domain id of each candidate)")
    left = torch.as_tensor(budgets, dtype=torch.long).clone()
    if int(left.sum()) < k:
        raise ValueError(f"budgets {left.tolist()} sum to less than k={k}")
    picked: list[int] = []
    for i in order.tolist():
        g = int(groups[i])
        if left[g] > 0:
            picked.append(i)
            left[g] -= 1
            if len(picked) == k:
                break
    if len(picked) < k:
        raise ValueError(f"budgets {budgets.tolist()} cannot be filled from the pool's domains")
    return torch.tensor(picked, dtype=torch.long)


class RankedSelector:
    """Base of score-ranking baselines: pick the k best by :meth:`score`.

    Subclasses set ``name``, ``requires`` and implement :meth:`score` (Tensor[n], larger = better).

    Args:
        per_domain_budgets: if True, rank within per-domain budgets (``budget`` policy) instead of
            taking the global top-k.
        budget: budget policy (see :class:`~mixsel.selection.budgets.BudgetPolicy`), used with
            ``per_domain_budgets``.
        shares: per-domain shares for ``budget="fixed"``.
        minimum: per-domain floor for ``budget="minimum"``.
        rounding: budget rounding (:func:`mixsel.selection.budgets.round_quotas`); ``"carry"`` keeps
            remainders across steps in ``state_dict()``.
    """

    name: str = "ranked"
    requires: frozenset[str] = frozenset()

    def __init__(
        self,
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
    ) -> None:
        self.budgets = BudgetPolicy.of(budget, shares, minimum, enabled=per_domain_budgets, rounding=rounding)

    def score(self, pool: Pool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        scores = self.score(pool)
        info: dict[str, Any] = {"method": self.name}
        groups, budgets = self.budgets.constraint(pool, k, info)
        indices = ranked_pick(scores, k, groups=groups, budgets=budgets)
        return Selection.uniform(indices, gains=scores[indices].to(torch.float32), info=info)

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)
