"""Per-domain budgets for partition-matroid selection (how many of the k picks each domain gets)."""

from __future__ import annotations

import torch

__all__ = ["budgets_from_weights", "proportional_budgets"]


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


def proportional_budgets(counts: torch.Tensor, k: int, *, minimum: int = 0) -> torch.Tensor:
    """Budgets proportional to the pool's domain counts: k_d ~ k * n_d / n (PartitionSel's default).

    Args:
        counts: LongTensor[D] candidates of each domain in the pool.
        k: total number to select.
        minimum: each present domain gets at least min(minimum, n_d) picks first.

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
    return floor + _largest_remainder(quota, rest, spare)


def budgets_from_weights(counts: torch.Tensor, k: int, weights: torch.Tensor) -> torch.Tensor:
    """Budgets following domain weights (e.g. from a reweighter), capped by what the pool holds.

    k_d ~ k * w_d, rounded by largest remainder; units a domain cannot use (k_d > n_d) flow to the
    others in order of their weight.
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
    return _largest_remainder(quota, k, counts)
