"""Per-domain budgets k_d of a partition matroid: how many of the k picks each domain may get.

* :func:`proportional_budgets` (k_d ~ k n_d / n) and :func:`budgets_from_weights` (k_d ~ k w_d) round
  real quotas to integers summing to k, capped by what the pool holds, with one of
  :data:`ROUNDINGS`: ``"smallest_first"`` (the default; PartitionSel's and CoLM's code: floor every
  quota, then hand the leftover units to the smallest floors first, ties by domain id),
  ``"largest_remainder"`` (leftover units to the largest fractional parts) or ``"carry"`` (each
  domain's remainder is carried to the next step by a :class:`QuotaCarry`, so that with fewer picks
  than domains every domain still gets its share over the steps);
* :class:`BudgetPolicy` is the small value object every budgeted selector holds: which policy
  (``"proportional"``, ``"weights"``, ``"fixed"``, ``"minimum"``, ``"uniform"``), its parameters,
  and whether the selector applies budgets at all; :meth:`BudgetPolicy.constraint` gives the
  solvers' ``(groups, budgets)`` pair for a concrete pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.selection.base import Pool, check_k

log = logging.getLogger(__name__)
_WARNED_SMALL_K: set[tuple[int, int]] = set()  # (k, domains) pairs already warned about

__all__ = [
    "BUDGET_POLICIES",
    "CARRY_KEY",
    "ROUNDINGS",
    "ROUNDING_HINT",
    "BudgetPolicy",
    "QuotaCarry",
    "budgets_from_weights",
    "proportional_budgets",
    "round_quotas",
]

BUDGET_POLICIES = ("proportional", "weights", "fixed", "minimum", "uniform")
ROUNDINGS = ("smallest_first", "largest_remainder", "carry")
#: key of the carry in the state_dict of a selector with ``rounding="carry"``
CARRY_KEY = "budget_carry"


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding={rounding!r} is not a budget rounding; choose one of {', '.join(ROUNDINGS)}")


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
        raise ConfigError(f"cannot place k={k} picks: the domains only hold {int(caps.sum())} candidates")
    return base


class QuotaCarry:
    """The state of ``rounding="carry"``: each domain's rounding remainder, carried from step to step.

    Any rounding that looks at one step only gives the same domains the leftover picks every step
    when there are fewer picks than domains (quotas [0.5, 0.3, 0.2] and k = 1: ``smallest_first``
    and ``largest_remainder`` both pick domain 0 forever). Here each call to :meth:`round` adds the
    carry to the step's quotas, acc_d = quota_d + carry_d, gives every domain floor(acc_d) picks and
    the leftover units to the largest remainders acc_d - floor(acc_d) (ties: lowest domain id), and
    keeps carry_d = acc_d - k_d for the next step. Exactly: the budgets are the k largest "unit
    values" acc_d - j (j = 0, 1, ..., n_d - 1) over all domains, which is that rule whenever the
    floors fit, and stays defined when caps or negative carries make them not fit.

    Guarantee: domain d's picks over T steps equal the sum of its T quotas minus its carry (until a
    clip below forgives part of it), and the carry lies in [-1, 1]. With constant quotas and at most
    3 domains whose caps do not bind it stays strictly inside (-1, 1) (tested); with more domains, or
    quotas that change every step (random pools), this greedy rule (the online rule of the "chairman
    assignment" problem) can fall slightly more than one pick behind (up to about 1.1 in random tests
    with 4 to 9 domains), and the clip at 1 forgives the excess.

    Caps: a domain never gets more than its n_d candidates; the units it cannot use go to the next
    largest unit values, i.e. to the other domains. Its carry (the credit it could not spend) and the
    others' (the debt of the units they absorbed) are clipped to [-1, 1]: a shortage forced by the
    pool is forgiven beyond one pick rather than repaid in a burst when the domain is back.

    The state is per selector (one ``QuotaCarry`` per :class:`BudgetPolicy`) and is saved by the
    selector's ``state_dict()`` as a plain list of floats (torch checkpoints and JSON alike), so an
    interrupted and resumed run picks the same budgets as an uninterrupted one.

    Args:
        values: a carry to start from (e.g. ``state_dict()["carry"]``); default none (zeros).

    Attributes:
        values: DoubleTensor[D] the carry of each domain, or None before the first step.
    """

    def __init__(self, values: Sequence[float] | torch.Tensor | None = None) -> None:
        self.values: torch.Tensor | None = None
        if values is not None:
            self.load_state_dict({"carry": values})

    def round(self, quota: torch.Tensor, k: int, caps: torch.Tensor) -> torch.Tensor:
        """This step's budgets from its real quotas, updating the carry.

        Args:
            quota: Tensor[D] non-negative real quotas summing to about k.
            k: the total.
            caps: LongTensor[D] upper bounds (the pool's domain counts).

        Returns:
            LongTensor[D] summing to k with 0 <= k_d <= caps_d.

        Raises:
            ValueError: if the caps hold fewer than k units, or ``quota`` has another number of domains
                than the carry.
        """
        quota = torch.as_tensor(quota).to(torch.float64).reshape(-1)
        caps = torch.as_tensor(caps, dtype=torch.long).reshape(-1)
        num = quota.numel()
        if caps.numel() != num:
            raise ValueError(f"caps has {caps.numel()} entries but there are {num} quotas")
        if int(caps.clamp(min=0).sum()) < k:
            raise ConfigError(f"cannot place k={k} picks: the domains only hold {int(caps.sum())} candidates")
        carry = torch.zeros(num, dtype=torch.float64) if self.values is None else self.values
        if carry.numel() != num:
            raise ValueError(
                f"the budget carry holds {carry.numel()} domains but these quotas have {num}: a selector's "
                "rounding='carry' state belongs to one mixture"
            )
        acc = quota + carry
        # the k largest unit values acc_d - j, j < min(n_d, k); a stable descending sort keeps
        # (domain id, j) order on ties, so ties go to the lowest domain id
        units = torch.minimum(caps.clamp(min=0), torch.full_like(caps, k))
        end = torch.cumsum(units, 0)
        unit = torch.arange(int(end[-1]))
        dom = torch.searchsorted(end, unit, right=True)  # the domain of each unit (repeat_interleave, faster)
        value = acc[dom] - (unit - (end - units)[dom]).to(torch.float64)
        order = torch.sort(value, descending=True, stable=True).indices[:k]
        budgets = torch.bincount(dom[order], minlength=num)
        self.values = (acc - budgets.to(torch.float64)).clamp(-1.0, 1.0)
        return budgets

    def reset(self) -> None:
        """Forget the carry (the next step starts from zero remainders)."""
        self.values = None

    def state_dict(self) -> dict[str, Any]:
        """``{"carry": [float, ...]}`` (an empty list before the first step)."""
        return {"carry": [] if self.values is None else self.values.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next budgets continue the saved run exactly."""
        values = torch.as_tensor(state["carry"], dtype=torch.float64).reshape(-1)
        if not torch.isfinite(values).all():
            raise ValueError(f"the budget carry must be finite, got {values.tolist()}")
        self.values = values.clone() if values.numel() else None

    def selector_state(self) -> dict[str, Any]:
        """``{"budget_carry": [float, ...]}``: the entry a selector merges into its ``state_dict()``."""
        return {CARRY_KEY: self.state_dict()["carry"]}

    def load_selector_state(self, state: dict[str, Any]) -> None:
        """Restore the carry from a selector's ``state_dict()`` (other keys are ignored).

        A state without ``"budget_carry"`` (saved under another rounding) starts the carry from zero,
        with a warning.
        """
        if CARRY_KEY not in state:
            log.warning(
                "budgets: the selector state has no %r (saved under another rounding): starting it at 0", CARRY_KEY
            )
            self.reset()
            return
        self.load_state_dict({"carry": state[CARRY_KEY]})


def round_quotas(
    quota: torch.Tensor,
    k: int,
    caps: torch.Tensor,
    rounding: str = "smallest_first",
    carry: QuotaCarry | None = None,
) -> torch.Tensor:
    """Integers summing to k, each <= its cap, from non-negative real quotas (sum ~ k).

    Args:
        quota: Tensor[D] real quotas (e.g. k n_d / n).
        k: the total.
        caps: LongTensor[D] upper bounds (the pool's domain counts).
        rounding: ``"smallest_first"`` (floors, leftover units to the smallest floors first, ties by
            domain id: PartitionSel's and CoLM's code), ``"largest_remainder"`` or ``"carry"``
            (remainders carried across steps in ``carry``, see :class:`QuotaCarry`).
        carry: the :class:`QuotaCarry` of the caller, required by (and only read by) ``"carry"``.

    Returns:
        LongTensor[D].
    """
    _check_rounding(rounding)
    _warn_small_k(k, len(quota), rounding)
    caps = torch.as_tensor(caps, dtype=torch.long)
    if rounding == "carry":
        if carry is None:
            raise ValueError("rounding='carry' carries remainders across steps: pass carry=QuotaCarry() and keep it")
        return carry.round(torch.as_tensor(quota), k, caps)
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
            raise ConfigError(f"cannot place k={k} picks: the domains only hold {int(caps.sum())} candidates")
    return base


def proportional_budgets(
    counts: torch.Tensor,
    k: int,
    *,
    minimum: int = 0,
    rounding: str = "smallest_first",
    carry: QuotaCarry | None = None,
) -> torch.Tensor:
    """Budgets proportional to the pool's domain counts: k_d ~ k * n_d / n (PartitionSel's default).

    Args:
        counts: LongTensor[D] candidates of each domain in the pool.
        k: total number to select.
        minimum: each present domain gets at least min(minimum, n_d) picks first.
        rounding: see :func:`round_quotas` (default: the reference code's smallest-first rule).
        carry: the caller's :class:`QuotaCarry`, for ``rounding="carry"`` (it rounds the quotas of
            the picks left after the ``minimum`` floors).

    Returns:
        LongTensor[D] summing to k with 0 <= k_d <= n_d.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    total = int(counts.sum())
    if k > total:
        raise ConfigError(f"budget k={k} is larger than the pool ({total} candidates)")
    if k <= 0:
        raise ConfigError(f"k must be positive, got {k}")
    floor = torch.minimum(counts, torch.full_like(counts, minimum))
    if int(floor.sum()) > k:
        raise ConfigError(f"minimum={minimum} per domain needs {int(floor.sum())} picks but k={k}")
    rest = k - int(floor.sum())
    spare = counts - floor
    if rest == 0:
        return floor
    quota = rest * spare.to(torch.float64) / max(int(spare.sum()), 1)
    return floor + round_quotas(quota, rest, spare, rounding, carry)


def budgets_from_weights(
    counts: torch.Tensor,
    k: int,
    weights: torch.Tensor,
    *,
    rounding: str = "smallest_first",
    carry: QuotaCarry | None = None,
) -> torch.Tensor:
    """Budgets following domain weights (e.g. from a reweighter), capped by what the pool holds.

    k_d ~ k * w_d, rounded by ``rounding`` (:func:`round_quotas`, with the caller's ``carry`` for
    ``"carry"``); units a domain cannot use (k_d > n_d) flow to the others.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != counts.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but there are {counts.numel()} domains")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"domain weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    if k > int(counts.sum()):
        raise ConfigError(f"budget k={k} is larger than the pool ({int(counts.sum())} candidates)")
    quota = k * weights / weights.sum()
    return round_quotas(quota, k, counts, rounding, carry)


#: How :func:`_warn_small_k` names the fix, in the syntax of the route the user is in (``mixsel train``'s
#: by default; the Hugging Face trainers set their own around each selection).
ROUNDING_HINT: ContextVar[str] = ContextVar("rounding_hint", default="selection.options={rounding: carry}")


def _warn_small_k(k: int, num_domains: int, rounding: str) -> None:
    """Log once per (k, domains) when a per-step rounding, not the quotas, decides the batch.

    With fewer picks than domains most quotas floor to 0 and every step gives the leftover units to
    the same domains (``smallest_first``: by domain id; ``largest_remainder``: the largest quotas), so
    the others are never picked (experiment 8, k = 4 of 7 domains: arithmetic 17% of the budgets
    against 7% of the pools; ``benchmarks/budget_shares.py``). ``rounding="carry"`` carries the
    remainders across steps and is not warned about. Called by :func:`round_quotas`, so every
    budgeted selector (CoLM's big sources included) is covered.
    """
    if rounding == "carry" or k >= num_domains or (k, num_domains) in _WARNED_SMALL_K:
        return
    _WARNED_SMALL_K.add((k, num_domains))
    log.warning(
        "budgets: k=%d picks over %d domains: %s rounding hands the leftover picks to the domains that sort "
        "first at every step, so the others are under-sampled or never trained; use "
        "%s (remainders carried across steps) or a batch of at least %d",
        k,
        num_domains,
        rounding,
        ROUNDING_HINT.get(),
        num_domains,
    )


def _check_shares(policy: str, shares: Sequence[float]) -> tuple[float, ...]:
    """``shares`` as floats, or one clear ``ValueError``: only ``budget="fixed"`` reads them, and they
    must be finite, non-negative and not all zero."""
    if policy != "fixed":
        raise ConfigError(
            f"shares={list(shares)} is only read with budget='fixed' (budget={policy!r} ignores it): "
            "add budget=fixed, or drop shares"
        )
    try:
        values = tuple(float(s) for s in shares)
    except (TypeError, ValueError):
        raise ConfigError(f"shares must be a list of numbers (one per domain), got {shares!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"shares must be finite, non-negative and not all zero (one per domain), got {list(values)}")
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
    quotas become integers by ``rounding`` (:func:`round_quotas`). With ``rounding="carry"`` the
    policy holds a :class:`QuotaCarry` (:attr:`carry`), which its selector saves and restores
    through :meth:`state_dict` / :meth:`load_state_dict`.

    Attributes:
        policy: one of :data:`BUDGET_POLICIES`.
        shares: per-domain shares for ``"fixed"`` (domain-id order).
        minimum: per-domain floor for ``"minimum"``.
        enabled: whether the selector applies budgets; ``False`` selects over the whole pool.
        rounding: one of :data:`ROUNDINGS`; default ``"smallest_first"`` (PartitionSel's and CoLM's
            code), ``"largest_remainder"`` and ``"carry"`` (remainders carried across steps) as options.
    """

    policy: str = "proportional"
    shares: tuple[float, ...] | None = None
    minimum: int = 1
    enabled: bool = True
    rounding: str = "smallest_first"

    def __post_init__(self) -> None:
        if self.policy not in BUDGET_POLICIES:
            raise ConfigError(
                f"budget={self.policy!r} is not a budget policy; choose one of {', '.join(BUDGET_POLICIES)}"
            )
        if self.policy == "fixed" and self.shares is None:
            raise ConfigError(
                "budget='fixed' needs shares=[...] (one non-negative share per domain, in domain-id order)"
            )
        if self.shares is not None:
            object.__setattr__(self, "shares", _check_shares(self.policy, self.shares))
        if self.minimum < 0:
            raise ConfigError(f"minimum={self.minimum} must be >= 0 (picks guaranteed to each present domain)")
        object.__setattr__(self, "minimum", int(self.minimum))
        object.__setattr__(self, "enabled", bool(self.enabled))
        _check_rounding(self.rounding)
        # mutable state of the frozen policy, not a field: equality and hashing ignore it
        object.__setattr__(self, "_carry", QuotaCarry() if self.rounding == "carry" else None)

    @property
    def carry(self) -> QuotaCarry | None:
        """The remainders carried across steps (``rounding="carry"``), else None."""
        return self._carry  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [float, ...]}`` with ``rounding="carry"``, else ``{}`` (nothing to save).

        Selectors merge it into their own ``state_dict()``.
        """
        return {} if self.carry is None else self.carry.selector_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the carry from a selector's ``state_dict()`` (:meth:`QuotaCarry.load_selector_state`);
        a no-op for the other roundings, which ignore a saved carry."""
        if self.carry is not None:
            self.carry.load_selector_state(state)

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
        """Per-domain budgets for ``pool``: LongTensor[num_domains] with sum k and 0 <= k_d <= n_d.

        With ``rounding="carry"`` each call is one step: it advances :attr:`carry`.
        """
        check_k(k, pool.size)
        counts = pool.domain_counts()
        r, c = self.rounding, self.carry
        if self.policy == "proportional":
            return proportional_budgets(counts, k, rounding=r, carry=c)
        if self.policy == "minimum":
            return proportional_budgets(counts, k, minimum=self.minimum, rounding=r, carry=c)
        if self.policy == "uniform":
            return budgets_from_weights(counts, k, (counts > 0).to(torch.float64), rounding=r, carry=c)
        if self.policy == "weights":
            if pool.domain_weights is None:
                raise ConfigError("budget='weights' needs domain weights in the pool: enable a reweighter")
            return budgets_from_weights(counts, k, pool.domain_weights, rounding=r, carry=c)
        weights = torch.as_tensor(list(self.shares or []), dtype=torch.float64)
        if weights.numel() != pool.num_domains:
            raise ConfigError(f"shares has {weights.numel()} entries but the mixture has {pool.num_domains} domains")
        return budgets_from_weights(counts, k, weights, rounding=r, carry=c)

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
