"""Greedy facility location (CRAIG medoids), optionally under a partition matroid.

Maximises F(S) = sum_i max_{s in S} sim[i, s] over |S| <= k, the objective of CRAIG
(Mirzasoleiman, Bilmes & Leskovec, ICML 2020, arXiv 1906.01827) and of CoLM Eq. (2) / Eq. (8)
(Nguyen et al., ICLR 2025, arXiv 2407.19580; docs/methods.md), where ``sim = C - ||g_i - g_s||``
(CoLM uses the L1 distance between sparsified, Adam-normalised zeroth-order gradients). F is
monotone submodular once the similarities are non-negative, so the greedy algorithm is a
(1 - 1/e)-approximation under a cardinality constraint (Nemhauser, Wolsey & Fisher 1978) and a
1/2-approximation under a matroid such as per-group budgets (Fisher, Nemhauser & Wolsey 1978).

Objective and optimiser are separate axes (as in apricot): ``FacilityLocationGains`` answers the
small gain/commit protocol ``GainOracle`` (gains of all or of some candidates for the current set,
commit a pick), and each optimiser (``naive_greedy``, ``lazy_greedy``, ``stochastic_greedy``,
looked up by name in ``OPTIMIZERS``) drives it under a ``PartitionBudget``.

Implementation: pure torch, vectorised over candidates, with a running max-vector
``cur[i] = max_{s in S} sim[i, s]``; the gain of candidate j is ``sum_i relu(sim[i, j] - cur[i])``.
Candidates are processed in row chunks of the transposed similarity, so the memory overhead is
``chunk_size * n`` elements on top of the similarity itself (n = 16384 fits easily). Every gain
is computed by the same routine (one contiguous row reduction per candidate), so naive and lazy
greedy see bit-identical gains and return the same ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mixsel.solvers._budgets import PartitionBudget
from mixsel.solvers._checks import check_k, check_matrix, check_partition
from mixsel.types import Selection

__all__ = ["facility_location", "pairwise_l1", "similarity_from_distance"]

Method = Literal["lazy", "naive", "stochastic"]
_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of float32 per working block


def pairwise_l1(x: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Pairwise L1 distances ``D[i, j] = ||x_i - x_j||_1``, computed in row chunks.

    CoLM (Eq. 8) uses the L1 distance between sparsified normalised gradients.

    Args:
        x: Tensor[n, d] of features (finite).
        chunk_size: rows per block; default keeps each block around 64 MB.

    Returns:
        Tensor[n, n] of distances in ``x``'s floating dtype (float32 for integer input).
    """
    x = check_matrix(x, "x")
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a in range(0, n, chunk_size):
        out[a : a + chunk_size] = torch.cdist(x[a : a + chunk_size], x, p=1.0)
    return out


def similarity_from_distance(dist: torch.Tensor) -> torch.Tensor:
    """Similarity ``max(D) - D`` from a distance matrix (CRAIG / CoLM Eq. 2 with C = max D).

    The result is non-negative, so facility location needs no further shift.
    """
    dist = check_matrix(dist, "dist", square=True)
    if (dist < 0).any():
        raise ValueError("dist must be non-negative (a distance matrix)")
    return dist.max() - dist


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- the objective
class GainOracle(Protocol):
    """What a greedy optimiser needs from a monotone submodular objective (apricot's split).

    ``all()`` and ``__call__(cols)`` return the marginal gains F(S + j) - F(S) of every candidate
    / of the candidates ``cols`` for the current set S; ``commit(j)`` adds ``j`` to S. The two gain
    methods must agree bit for bit, so that every exact optimiser returns the same ranking.
    """

    n: int
    dtype: torch.dtype

    def all(self) -> torch.Tensor: ...

    def __call__(self, cols: torch.Tensor) -> torch.Tensor: ...

    def commit(self, j: int) -> None: ...


class FacilityLocationGains:
    """Facility-location gains ``sum_i relu(sim[i, j] - shift - cur[i])`` against the running max.

    ``cur[i] = max_{s in S} sim[i, s] - shift`` (0 for the empty set). ``cand`` is candidate-major
    and contiguous (the similarity itself when it is symmetric, else one transposed copy), so
    each gain is one contiguous row reduction whatever the batch.
    """

    def __init__(self, similarity: torch.Tensor, shift: float, chunk_size: int) -> None:
        symmetric = torch.equal(similarity, similarity.T)
        self.cand = similarity.contiguous() if symmetric else similarity.T.contiguous()
        self.shift = shift
        self.chunk = chunk_size
        self.dtype = _acc_dtype(similarity.dtype)
        self.n = similarity.shape[0]
        self.cur = torch.zeros(self.n, dtype=self.dtype, device=similarity.device)
        self.evaluations = 0

    def _reduce(self, block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return (block.to(self.dtype) - offset).clamp_(min=0).sum(dim=1)

    def __call__(self, cols: torch.Tensor) -> torch.Tensor:
        """Gains of the candidates ``cols``."""
        out = torch.empty(cols.numel(), dtype=self.dtype, device=self.cur.device)
        offset = self.cur + self.shift  # sim - shift - cur == sim - (cur + shift)
        for a in range(0, cols.numel(), self.chunk):
            out[a : a + self.chunk] = self._reduce(self.cand.index_select(0, cols[a : a + self.chunk]), offset)
        self.evaluations += cols.numel()
        return out

    def all(self) -> torch.Tensor:
        """Gains of every candidate (contiguous slices, no gather)."""
        out = torch.empty(self.n, dtype=self.dtype, device=self.cur.device)
        offset = self.cur + self.shift
        for a in range(0, self.n, self.chunk):
            out[a : a + self.chunk] = self._reduce(self.cand[a : a + self.chunk], offset)
        self.evaluations += self.n
        return out

    def commit(self, j: int) -> None:
        col = self.cand[j].to(self.dtype) - self.shift
        torch.maximum(self.cur, col, out=self.cur)


# --------------------------------------------------------------------------- the optimisers
@dataclass(frozen=True)
class GreedyOptions:
    """Knobs of the optimisers; each reads only its own.

    Attributes:
        lazy_batch: stale candidates re-evaluated at once by lazy greedy (doubles within a step).
        epsilon: stochastic greedy accuracy parameter in (0, 1).
        generator: torch.Generator of stochastic greedy (a fixed seed 0 when None).
    """

    lazy_batch: int = 16
    epsilon: float = 0.1
    generator: torch.Generator | None = None


Picks = tuple[list[int], list[float]]
Optimizer = Callable[[GainOracle, int, PartitionBudget, GreedyOptions], Picks]


def _neg_inf(objective: GainOracle, device: torch.device) -> torch.Tensor:
    return torch.tensor(-math.inf, dtype=objective.dtype, device=device)


def naive_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Re-evaluate every gain at each step; pick the feasible maximum (ties: lowest index)."""
    picks: list[int] = []
    gains: list[float] = []
    neg_inf = _neg_inf(objective, budget.feasible.device)
    for _ in range(k):
        g = torch.where(budget.feasible, objective.all(), neg_inf)
        j = int(torch.argmax(g))  # first maximum = lowest index
        picks.append(j)
        gains.append(float(g[j]))
        objective.commit(j)
        budget.take(j)
    return picks, gains


def lazy_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Minoux's lazy greedy with vectorised batches of stale upper bounds; same ranking as naive.

    Stale gains are upper bounds (submodularity). Each step re-evaluates the ``lazy_batch``
    stale candidates of largest bound at once (doubling while the best bound is stale) until the
    feasible maximum, ties to the lowest index, is a fresh gain.
    """
    feasible = budget.feasible
    device = feasible.device
    neg_inf = _neg_inf(objective, device)
    ub = torch.where(feasible, objective.all(), neg_inf)
    fresh = torch.ones(objective.n, dtype=torch.bool, device=device)
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        feasible = budget.feasible
        bounds = torch.where(feasible, ub, neg_inf)
        batch = options.lazy_batch
        while True:
            j = int(torch.argmax(bounds))
            if fresh[j]:
                break
            stale = feasible & ~fresh
            m = min(batch, int(stale.sum()))
            cand = torch.topk(torch.where(stale, ub, neg_inf), m).indices
            g = objective(cand)
            ub[cand] = g
            bounds[cand] = g
            fresh[cand] = True
            batch *= 2
        picks.append(j)
        gains.append(float(ub[j]))
        fresh.zero_()
        objective.commit(j)
        budget.take(j)
    return picks, gains


def stochastic_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Each step picks the best of a random sample of ceil(n/k ln(1/epsilon)) feasible candidates."""
    n = objective.n
    gen = options.generator if options.generator is not None else torch.Generator().manual_seed(0)
    sample_size = min(n, max(1, math.ceil(n / k * math.log(1.0 / options.epsilon))))
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        cand = torch.nonzero(budget.feasible).reshape(-1)
        if cand.numel() > sample_size:
            cand = cand[torch.randperm(cand.numel(), generator=gen)[:sample_size].to(cand.device)]
            cand = torch.sort(cand).values
        g = objective(cand)
        best = int(torch.argmax(g))
        j = int(cand[best])
        picks.append(j)
        gains.append(float(g[best]))
        objective.commit(j)
        budget.take(j)
    return picks, gains


#: Optimisers by name. Naive and lazy greedy are exact (the same ranking; a test says so).
OPTIMIZERS: dict[str, Optimizer] = {"naive": naive_greedy, "lazy": lazy_greedy, "stochastic": stochastic_greedy}
EXACT_OPTIMIZERS = ("naive", "lazy")


# --------------------------------------------------------------------------- the public function
def facility_location(
    similarity: torch.Tensor,
    k: int,
    *,
    groups: torch.Tensor | Sequence[int] | None = None,
    budgets: torch.Tensor | Sequence[int] | None = None,
    method: Method = "lazy",
    epsilon: float = 0.1,
    generator: torch.Generator | None = None,
    lazy_batch: int = 16,
    chunk_size: int | None = None,
) -> Selection:
    """Greedy facility location: k medoids of a similarity matrix, weighted by cluster size.

    Maximises F(S) = sum_i max_{s in S} sim'[i, s] with sim' = sim - min(0, min(sim)) (shifted to
    be non-negative, so F is monotone submodular and F(empty) = 0). This is CRAIG's coreset
    objective (Mirzasoleiman et al., 2020) and CoLM Eq. (2) / (8) (Nguyen et al., 2025); for a
    distance matrix use ``similarity_from_distance(dist)`` (``max D - D``), e.g. with
    ``pairwise_l1`` as in CoLM.

    Guarantees: greedy is within 1 - 1/e of the optimum under |S| <= k (Nemhauser et al., 1978)
    and within 1/2 under the partition matroid given by ``groups``/``budgets`` (Fisher et al.,
    1978). Stochastic greedy is within 1 - 1/e - epsilon in expectation (Mirzasoleiman et al.,
    "Lazier than lazy greedy", AAAI 2015) for the cardinality constraint.

    Args:
        similarity: Tensor[n, n], larger = more alike (may be negative, e.g. negative distances).
            Row i is a point to cover, column s a candidate medoid.
        k: number of medoids, 1 <= k <= n.
        groups: optional LongTensor[n] of group ids (e.g. domains).
        budgets: optional per-group maximum counts (partition matroid); a group that reached its
            budget is skipped. Requires ``groups``; ``sum_g min(budgets[g], n_g)`` must be >= k.
        method: ``"naive"`` (re-evaluate every gain each step), ``"lazy"`` (Minoux's lazy greedy
            with vectorised batches of stale upper bounds; the same ranking as naive) or
            ``"stochastic"`` (each step evaluates a random sample of ceil(n/k * ln(1/epsilon))
            feasible candidates; seeded by ``generator``).
        epsilon: stochastic greedy accuracy parameter in (0, 1).
        generator: torch.Generator for ``"stochastic"`` (a fixed seed 0 is used when None).
        lazy_batch: number of stale candidates re-evaluated at once by lazy greedy (doubles
            within a step while the best bound is stale).
        chunk_size: candidates per working block (default keeps blocks near 64 MB).

    Returns:
        Selection with ``indices`` in pick order (ties: lowest index), ``weights`` = number of
        points whose most similar medoid is each pick (CRAIG weights; a point tied between
        medoids goes to the earliest pick), ``gains`` = marginal gains of F in pick order, and
        ``info`` with ``objective`` (F(S) in shifted units), ``shift``, ``method`` and the number
        of gain ``evaluations``.

    Raises:
        ValueError: non-square or non-finite ``similarity``, bad ``k``, ``method``, ``epsilon``,
            ``groups`` or ``budgets``.
    """
    similarity = check_matrix(similarity, "similarity", square=True)
    n = similarity.shape[0]
    k = check_k(k, n)
    groups, budgets = check_partition(groups, budgets, n, k)
    if method not in OPTIMIZERS:
        raise ValueError(f"method must be one of {', '.join(map(repr, OPTIMIZERS))}, got {method!r}")
    if method == "stochastic" and not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1) for stochastic greedy, got {epsilon}")
    if lazy_batch < 1:
        raise ValueError(f"lazy_batch must be >= 1, got {lazy_batch}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    shift = min(0.0, float(similarity.min()))
    objective = FacilityLocationGains(similarity, shift, chunk_size)
    device = similarity.device
    budget = PartitionBudget.for_torch(n, groups, budgets, device)
    options = GreedyOptions(lazy_batch=lazy_batch, epsilon=epsilon, generator=generator)
    picks, picked_gains = OPTIMIZERS[method](objective, k, budget, options)

    indices = torch.tensor(picks, dtype=torch.long, device=device)
    weights = _cluster_sizes(similarity, indices, chunk_size)
    gains = torch.tensor(picked_gains, dtype=objective.dtype)
    return Selection(
        indices=indices,
        weights=weights,
        gains=gains,
        info={
            "solver": "facility_location",
            "backend": f"torch-{device.type}",
            "method": method,
            "objective": float(gains.sum()),
            "shift": shift,
            "evaluations": objective.evaluations,
        },
    )


def _cluster_sizes(similarity: torch.Tensor, indices: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """CRAIG weights: how many points have each selected column as their most similar medoid."""
    n, k = similarity.shape[0], indices.numel()
    counts = torch.zeros(k, dtype=torch.long, device=similarity.device)
    rows = max(1, chunk_size * n // max(k, 1))
    for a in range(0, n, rows):
        block = similarity[a : a + rows].index_select(1, indices)
        counts += torch.bincount(torch.argmax(block, dim=1), minlength=k)
    return counts.to(torch.get_default_dtype())
