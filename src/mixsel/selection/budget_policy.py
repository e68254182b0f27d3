"""Budget policies and budget-aware ranking shared by the selectors.

Two small pieces every budgeted selector needs:

* :func:`resolve_budgets` turns a policy name (``"proportional"``, ``"weights"``, ``"fixed"``,
  ``"minimum"``) into per-domain budgets k_d (sum k, each k_d <= n_d) for a concrete pool, with the
  helpers of :mod:`mixsel.selection.budgets`;
* :func:`ranked_pick` takes the k best-scored candidates, globally or within per-domain budgets,
  breaking ties by the lowest index, and :class:`RankedSelector` wraps it into a selector whose
  subclasses only define a score (the heuristic baselines ``big_loss``, ``grad_norm``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import budgets_from_weights, proportional_budgets
from mixsel.types import Selection

__all__ = ["BUDGET_POLICIES", "RankedSelector", "check_budget_policy", "ranked_pick", "resolve_budgets"]

BUDGET_POLICIES = ("proportional", "weights", "fixed", "minimum")


def check_budget_policy(budget: str, shares: Sequence[float] | None, minimum: int) -> None:
    """Validate a budget policy configuration (call it in a selector's ``__init__``).

    Raises:
        ValueError: unknown policy, ``"fixed"`` without ``shares``, or a negative ``minimum``.
    """
    if budget not in BUDGET_POLICIES:
        raise ValueError(f"budget={budget!r} is not a budget policy; choose one of {', '.join(BUDGET_POLICIES)}")
    if budget == "fixed" and shares is None:
        raise ValueError("budget='fixed' needs shares=[...] (one non-negative share per domain, in domain-id order)")
    if minimum < 0:
        raise ValueError(f"minimum={minimum} must be >= 0 (picks guaranteed to each present domain)")


def resolve_budgets(
    pool: Pool,
    k: int,
    budget: str = "proportional",
    *,
    shares: Sequence[float] | None = None,
    minimum: int = 1,
) -> torch.Tensor:
    """Per-domain budgets k_d for ``pool`` under a policy (PartitionSel's partition-matroid capacities).

    Policies:
        ``"proportional"``: k_d ~ k * n_d / n (largest remainder), the PartitionSel default;
        ``"weights"``: k_d ~ k * w_d from ``pool.domain_weights`` (a reweighter drives the budgets);
        ``"fixed"``: k_d ~ k * shares_d with constant user ``shares``;
        ``"minimum"``: proportional, but each present domain first gets min(``minimum``, n_d) picks.
    Units a domain cannot use (k_d > n_d) flow to the others, so budgets always sum to k.

    Args:
        pool: the candidate pool (domain ids, counts and optional domain weights).
        k: total number to select.
        budget: policy name.
        shares: per-domain shares for ``"fixed"``.
        minimum: per-domain floor for ``"minimum"``.

    Returns:
        LongTensor[num_domains] with sum k and 0 <= k_d <= n_d.
    """
    check_budget_policy(budget, shares, minimum)
    check_k(pool, k)
    counts = pool.domain_counts()
    if budget == "proportional":
        return proportional_budgets(counts, k)
    if budget == "minimum":
        return proportional_budgets(counts, k, minimum=minimum)
    if budget == "weights":
        if pool.domain_weights is None:
            raise ValueError("budget='weights' needs domain weights in the pool: enable a reweighter")
        return budgets_from_weights(counts, k, pool.domain_weights)
    weights = torch.as_tensor(list(shares or []), dtype=torch.float64)
    if weights.numel() != pool.num_domains:
        raise ValueError(f"shares has {weights.numel()} entries but the mixture has {pool.num_domains} domains")
    return budgets_from_weights(counts, k, weights)


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
        budget: budget policy (see :func:`resolve_budgets`), used with ``per_domain_budgets``.
        shares: per-domain shares for ``budget="fixed"``.
        minimum: per-domain floor for ``budget="minimum"``.
    """

    name: str = "ranked"
    requires: frozenset[str] = frozenset()

    def __init__(
        self,
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
    ) -> None:
        check_budget_policy(budget, shares, minimum)
        self.per_domain_budgets = bool(per_domain_budgets)
        self.budget = budget
        self.shares = None if shares is None else [float(s) for s in shares]
        self.minimum = int(minimum)

    def score(self, pool: Pool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(pool, k)
        scores = self.score(pool)
        info: dict[str, Any] = {"method": self.name}
        budgets = None
        if self.per_domain_budgets:
            budgets = resolve_budgets(pool, k, self.budget, shares=self.shares, minimum=self.minimum)
            info["budgets"] = budgets.tolist()
        indices = ranked_pick(scores, k, groups=pool.domains, budgets=budgets)
        return Selection.uniform(indices, gains=scores[indices].to(torch.float32), info=info)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
