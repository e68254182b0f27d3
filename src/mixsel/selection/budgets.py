"""Per-domain budgets k_d of a partition matroid: how many of the k picks each domain may get.

* :func:`proportional_budgets` (k_d ~ k n_d / n) and :func:`budgets_from_weights` (k_d ~ k w_d) round
  real quotas to integers summing to k, capped by what the pool holds, with one of
  :data:`ROUNDINGS`: ``"smallest_first"`` (the default; PartitionSel's and CoLM's code: floor every
  quota, then hand the leftover units to the smallest floors first, ties by domain id) or
  ``"largest_remainder"`` (leftover units to the largest fractional parts);
* :class:`BudgetPolicy` is the small value object every budgeted selector holds: which policy
  (``"proportional"``, ``"weights"``, ``"fixed"``, ``"minimum"``, ``"uniform"``), its parameters,
  and whether the selector applies budgets at all; :meth:`BudgetPolicy.constraint` gives the
  solvers' ``(groups, budgets)`` pair for a concrete pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mixsel.selection.base import Pool, check_k

log = logging.getLogger(__name__)
_WARNED_SMALL_K: set[tuple[int, int]] = set()  # (k, domains) pairs already warned about

__all__ = [
    "BUDGET_POLICIES",
    "ROUNDINGS",
    "BudgetPolicy",
    "budgets_from_weights",
    "proportional_budgets",
    "round_quotas",
]

BUDGET_POLICIES = ("proportional", "weights", "fixed", "minimum", "uniform")
ROUNDINGS = ("smallest_first", "largest_remainder")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not a budget rounding; choose one of {', '.join(ROUNDINGS)}")


def _smallest_first(quota: torch.Tensor, k: int, caps: torch.Tensor) -> torch.Tensor:
    """Floor every quota, then one leftover unit at a time to the smallest floors (ties: lowest id).

    The order is fixed by the floors and cycled while units remain (the reference code's
    ``get_source_masks``, arXiv 2606.07954 and CoLM arXiv 2407.19580); domains with a zero quota or at
    their cap are skipped. Units no positive-quota domain can take (caps bind) go to domains with spare
    capacity in order of their quota.
    """
    quota = torch.minimum(quota.to(torch.float64), caps.to(torch.float64))
    base = torch.minimum(torch.floor(quota).long(), caps)
    remaining = k - int(base.sum())
    if remaining < 0:
        raise ValueError(f"budgets overshoot k={k}: {base.tolist()}")
    order = sorted((d for d in range(len(quota)) if quota[d] > 0), key=lambda d: (int(base[d]), d))
    while remaining > 0 and order:
        order = [d for d in order if base[d] < caps[d]]
        for d in order:
            if remaining == 0:
                break
            base[d] += 1
            remaining -= 1
    for d in sorted(range(len(quota)), key=lambda d: (-float(quota[d]), d)):
        spare = min(int(caps[d] - base[d]), remaining)
        base[d] += spare
        remaining -= spare
    if remaining > 0:
        raise ValueError(f"cannot place k={k} picks: the domains only hold {int(caps.sum())} candidates")
    return base


def round_quotas(quota: torch.Tensor, k: int, caps: torch.Tensor, rounding: str = "smallest_first") -> torch.Tensor:
    """Integers summing to k, each <= its cap, from non-negative real quotas (sum ~ k).

    Args:
        quota: Tensor[D] real quotas (e.g. k n_d / n).
        k: the total.
        caps: LongTensor[D] upper bounds (the pool's domain counts).
        rounding: ``"smallest_first"`` (floors, leftover units to the smallest floors first, ties by
            domain id: PartitionSel's and CoLM's code) or ``"largest_remainder"``.

    Returns:
        LongTensor[D].
    """
    _check_rounding(rounding)
    _warn_small_k(k, len(quota), rounding)
    caps = torch.as_tensor(caps, dtype=torch.long)
    if rounding == "largest_remainder":
        return _largest_remainder(torch.as_tensor(quota), k, caps)
    return _smallest_first(torch.as_tensor(quota), k, caps)


def _largest_remainder(quota: torch.Tensor, k: int, caps: torch.Tensor) -> torch.Tensor:
    """Round non-negative real ``quota`` (sum ~ k) to integers summing to k, each <= caps.

    Floors first, then hands out the remaining units by largest fractional part (ties: lowest id),
    skipping domains at their cap; leftover units (if caps bind) go to domains with spare capacity
    in order of their quota.
    """
    quota = torch.minimum(quota.to(torch.float64), caps.to(torch.float64))
    base = torch.floor(quota).long()
    base = torch.minimum(base, caps)
    remaining = k - int(base.sum())
    if remaining < 0:
        raise ValueError(f"budgets overshoot k={k}: {base.tolist()}")
    frac = quota - base.to(torch.float64)
    # stable order: larger fraction first, then lower domain id
    order = sorted(range(len(quota)), key=lambda d: (-float(frac[d]), -float(quota[d]), d))
    while remaining > 0:
        progressed = False
        for d in order:
            if remaining == 0:
                break
            if base[d] < caps[d]:
                base[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place k={k} picks: the domains only hold {int(caps.sum())} candidates")
    return base


def proportional_budgets(
    counts: torch.Tensor, k: int, *, minimum: int = 0, rounding: str = "smallest_first"
) -> torch.Tensor:
    """Budgets proportional to the pool's domain counts: k_d ~ k * n_d / n (PartitionSel's default).

    Args:
        counts: LongTensor[D] candidates of each domain in the pool.
        k: total number to select.
        minimum: each present domain gets at least min(minimum, n_d) picks first.
        rounding: see :func:`round_quotas` (default: the reference code's smallest-first rule).

    Returns:
        LongTensor[D] summing to k with 0 <= k_d <= n_d.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    total = int(counts.sum())
    if k > total:
        raise ValueError(f"budget k={k} is larger than the pool ({total} candidates)")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    floor = torch.minimum(counts, torch.full_like(counts, minimum))
    if int(floor.sum()) > k:
        raise ValueError(f"minimum={minimum} per domain needs {int(floor.sum())} picks but k={k}")
    rest = k - int(floor.sum())
    spare = counts - floor
    if rest == 0:
        return floor
    quota = rest * spare.to(torch.float64) / max(int(spare.sum()), 1)
    return floor + round_quotas(quota, rest, spare, rounding)


def budgets_from_weights(
    counts: torch.Tensor, k: int, weights: torch.Tensor, *, rounding: str = "smallest_first"
) -> torch.Tensor:
    """Budgets following domain weights (e.g. from a reweighter), capped by what the pool holds.

    k_d ~ k * w_d, rounded by ``rounding`` (:func:`round_quotas`); units a domain cannot use
    (k_d > n_d) flow to the others.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != counts.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but there are {counts.numel()} domains")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"domain weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    if k > int(counts.sum()):
        raise ValueError(f"budget k={k} is larger than the pool ({int(counts.sum())} candidates)")
    quota = k * weights / weights.sum()
    return round_quotas(quota, k, counts, rounding)


def _warn_small_k(k: int, num_domains: int, rounding: str) -> None:
    """Log once per (k, domains) when ``smallest_first`` rounding, not the quotas, decides the batch.

    With fewer picks than domains most quotas floor to 0 and the leftover units go by domain id, so
    the domains that sort first get more than their share (experiment 8, k = 4 of 7 domains:
    arithmetic 17% of the budgets against 7% of the pools; ``benchmarks/budget_shares.py``). Called
    by :func:`round_quotas`, so every budgeted selector (CoLM's big sources included) is covered.
    """
    if rounding != "smallest_first" or k >= num_domains or (k, num_domains) in _WARNED_SMALL_K:
        return
    _WARNED_SMALL_K.add((k, num_domains))
    log.warning(
        "budgets: k=%d picks over %d domains: most quotas round down to 0 and smallest_first rounding hands "
        "the leftover picks out by domain id, so the first domains get more than their share; for "
        "proportional batches use selection.options={rounding: largest_remainder} or a batch of at least %d",
        k,
        num_domains,
        num_domains,
    )


def _check_shares(policy: str, shares: Sequence[float]) -> tuple[float, ...]:
    """``shares`` as floats, or one clear ``ValueError``: only ``budget="fixed"`` reads them, and they
    must be finite, non-negative and not all zero."""
    if policy != "fixed":
        raise ValueError(
            f"shares={list(shares)} is only read with budget='fixed' (budget={policy!r} ignores it): "
            "add budget=fixed, or drop shares"
        )
    try:
        values = tuple(float(s) for s in shares)
    except (TypeError, ValueError):
        raise ValueError(f"shares must be a list of numbers (one per domain), got {shares!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"shares must be finite, non-negative and not all zero (one per domain), got {list(values)}")
    return values


@dataclass(frozen=True)
class BudgetPolicy:
    """How a selector splits k over the domains (the partition matroid's capacities).

    Policies:
        ``"proportional"``: k_d ~ k * n_d / n, the PartitionSel default;
        ``"weights"``: k_d ~ k * w_d from ``pool.domain_weights`` (a reweighter drives the budgets);
        ``"fixed"``: k_d ~ k * shares_d with constant user ``shares``;
        ``"minimum"``: proportional, but each present domain first gets min(``minimum``, n_d) picks;
        ``"uniform"``: equal shares over the present domains.
    Units a domain cannot use (k_d > n_d) flow to the others, so budgets always sum to k. Real
    quotas become integers by ``rounding`` (:func:`round_quotas`).

    Attributes:
        policy: one of :data:`BUDGET_POLICIES`.
        shares: per-domain shares for ``"fixed"`` (domain-id order).
        minimum: per-domain floor for ``"minimum"``.
        enabled: whether the selector applies budgets; ``False`` selects over the whole pool.
        rounding: one of :data:`ROUNDINGS`; default ``"smallest_first"`` (PartitionSel's and CoLM's
            code), ``"largest_remainder"`` as an option.
    """

    policy: str = "proportional"
    shares: tuple[float, ...] | None = None
    minimum: int = 1
    enabled: bool = True
    rounding: str = "smallest_first"

    def __post_init__(self) -> None:
        if self.policy not in BUDGET_POLICIES:
            raise ValueError(
                f"budget={self.policy!r} is not a budget policy; choose one of {', '.join(BUDGET_POLICIES)}"
            )
        if self.policy == "fixed" and self.shares is None:
            raise ValueError(
                "budget='fixed' needs shares=[...] (one non-negative share per domain, in domain-id order)"
            )
        if self.shares is not None:
            object.__setattr__(self, "shares", _check_shares(self.policy, self.shares))
        if self.minimum < 0:
            raise ValueError(f"minimum={self.minimum} must be >= 0 (picks guaranteed to each present domain)")
        object.__setattr__(self, "minimum", int(self.minimum))
        object.__setattr__(self, "enabled", bool(self.enabled))
        _check_rounding(self.rounding)

    @classmethod
    def of(
        cls,
        budget: str,
        shares: Sequence[float] | None,
        minimum: int,
        enabled: bool = True,
        rounding: str = "smallest_first",
    ) -> BudgetPolicy:
        """The policy from a selector's keyword options (``budget``, ``shares``, ``minimum``, ``rounding``)."""
        return cls(budget, None if shares is None else tuple(shares), minimum, enabled, rounding)

    def resolve(self, pool: Pool, k: int) -> torch.Tensor:
        """Per-domain budgets for ``pool``: LongTensor[num_domains] with sum k and 0 <= k_d <= n_d."""
        check_k(k, pool.size)
        counts = pool.domain_counts()
        r = self.rounding
        if self.policy == "proportional":
            return proportional_budgets(counts, k, rounding=r)
        if self.policy == "minimum":
            return proportional_budgets(counts, k, minimum=self.minimum, rounding=r)
        if self.policy == "uniform":
            return budgets_from_weights(counts, k, (counts > 0).to(torch.float64), rounding=r)
        if self.policy == "weights":
            if pool.domain_weights is None:
                raise ValueError("budget='weights' needs domain weights in the pool: enable a reweighter")
            return budgets_from_weights(counts, k, pool.domain_weights, rounding=r)
        weights = torch.as_tensor(list(self.shares or []), dtype=torch.float64)
        if weights.numel() != pool.num_domains:
            raise ValueError(f"shares has {weights.numel()} entries but the mixture has {pool.num_domains} domains")
        return budgets_from_weights(counts, k, weights, rounding=r)

    def constraint(
        self, pool: Pool, k: int, info: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The solvers' ``(groups, budgets)``: the pool's domain ids and :meth:`resolve`, or
        ``(None, None)`` when budgets are disabled. Records the budgets in ``info`` when given."""
        if not self.enabled:
            return None, None
        budgets = self.resolve(pool, k)
        if info is not None:
            info["budgets"] = budgets.tolist()
        return pool.domains, budgets
