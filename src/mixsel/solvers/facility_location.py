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

Implementation (backend ``numpy-cpu``): the greedy loop is sequential, with a few small vector
operations per pick, so it runs in numpy on the CPU, where a call costs about a microsecond and
never competes for threads (torch's per-call overhead and its intra-op threads dominated the
previous torch loop at n = 2048). A CUDA similarity is copied to the host once (n^2 elements),
and the indices come back on its device. The running offset
``offset[i] = max(shift, max_{s in S} sim[i, s])`` starts at ``shift``; the gain of candidate j is
``sum_i relu(sim[i, j] - offset[i])``, accumulated in float64 whatever the input dtype, so the
ranking is that of exact arithmetic except for gains equal to ~1e-13 relative (float32
accumulation let such near-ties flip). Candidates are evaluated in cache-sized row blocks of the
candidate-major similarity (the similarity itself when it is symmetric, else one transposed
copy). Every gain is computed by the same routine (one contiguous float64 row reduction per
candidate, whatever the block), so naive and lazy greedy see bit-identical gains and return the
same ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from mixsel.solvers._budgets import PartitionBudget
from mixsel.solvers._checks import check_k, check_matrix, check_partition
from mixsel.types import Selection

__all__ = ["facility_location", "pairwise_l1", "similarity_from_distance"]

Method = Literal["lazy", "naive", "stochastic"]
_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of float32 per block of pairwise_l1
_GAIN_BLOCK_ELEMENTS = 1 << 16  # 512 KB of float64 per block of gains: stays in cache
_SYMMETRY_TILE = 256


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


def _is_symmetric(a: np.ndarray) -> bool:
    """Exact symmetry, compared tile by tile (a whole-matrix transpose thrashes the cache)."""
    n, t = a.shape[0], _SYMMETRY_TILE
    for i in range(0, n, t):
        for j in range(i, n, t):
            if not np.array_equal(a[i : i + t, j : j + t], a[j : j + t, i : i + t].T):
                return False
    return True


def _transpose(a: np.ndarray) -> np.ndarray:
    """A contiguous transposed copy, tile by tile."""
    n, t = a.shape[0], _SYMMETRY_TILE
    out = np.empty_like(a)
    for i in range(0, n, t):
        for j in range(0, n, t):
            out[j : j + t, i : i + t] = a[i : i + t, j : j + t].T
    return out


# --------------------------------------------------------------------------- the objective
class GainOracle(Protocol):
    """What a greedy optimiser needs from a monotone submodular objective (apricot's split).

    ``all()`` and ``__call__(cols)`` return the float64 marginal gains F(S + j) - F(S) of every
    candidate / of the candidates ``cols`` for the current set S; ``commit(j)`` adds ``j`` to S.
    The two gain methods must agree bit for bit, so that every exact optimiser returns the same
    ranking, and a gain may only shrink as S grows (submodularity, also in floating point).
    """

    n: int

    def all(self) -> np.ndarray: ...

    def __call__(self, cols: np.ndarray) -> np.ndarray: ...

    def commit(self, j: int) -> None: ...


class FacilityLocationGains:
    """Facility-location gains ``sum_i relu(sim[i, j] - offset[i])`` against the running max.

    ``offset[i] = max(shift, max_{s in S} sim[i, s])``. ``cand`` is candidate-major and
    contiguous (row j = column j of the similarity), so each gain is one contiguous row
    reduction whatever the batch; the reduction runs in float64 on reused buffers of
    ``block`` rows. Gains only shrink as the offset grows (every operation is monotone), so
    stale gains are exact upper bounds for lazy greedy.
    """

    def __init__(self, similarity: np.ndarray, shift: float, block: int) -> None:
        self.cand = similarity if _is_symmetric(similarity) else _transpose(similarity)
        self.n = similarity.shape[0]
        self.offset = np.full(self.n, shift, dtype=np.float64)
        self.block = block
        self._work = np.empty((0, self.n), dtype=np.float64)
        self.evaluations = 0

    def _reduce(self, rows: np.ndarray, out: np.ndarray) -> None:
        if self._work.shape[0] < rows.shape[0]:
            self._work = np.empty((rows.shape[0], self.n), dtype=np.float64)
        work = self._work[: rows.shape[0]]
        np.subtract(rows, self.offset, out=work)
        np.maximum(work, 0.0, out=work)
        work.sum(axis=1, out=out)

    def __call__(self, cols: np.ndarray) -> np.ndarray:
        """Gains of the candidates ``cols``."""
        out = np.empty(cols.shape[0], dtype=np.float64)
        for a in range(0, cols.shape[0], self.block):
            self._reduce(self.cand[cols[a : a + self.block]], out[a : a + self.block])
        self.evaluations += cols.shape[0]
        return out

    def all(self) -> np.ndarray:
        """Gains of every candidate (contiguous slices, no gather)."""
        out = np.empty(self.n, dtype=np.float64)
        for a in range(0, self.n, self.block):
            self._reduce(self.cand[a : a + self.block], out[a : a + self.block])
        self.evaluations += self.n
        return out

    def commit(self, j: int) -> None:
        np.maximum(self.offset, self.cand[j], out=self.offset)

    def cluster_sizes(self, picks: list[int]) -> np.ndarray:
        """CRAIG weights: how many points have each pick as their most similar medoid.

        A point tied between medoids goes to the earliest pick (argmax returns the first).
        """
        k = len(picks)
        counts = np.zeros(k, dtype=np.int64)
        width = max(1, self.block * self.n // max(k, 1))
        rows = self.cand[picks]  # [k, n]: rows[p, i] = sim[i, picks[p]]
        for a in range(0, self.n, width):
            counts += np.bincount(np.argmax(rows[:, a : a + width], axis=0), minlength=k)
        return counts


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


def naive_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Re-evaluate every gain at each step; pick the feasible maximum (ties: lowest index)."""
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        g = objective.all()
        g[~budget.feasible] = -np.inf
        j = int(g.argmax())  # first maximum = lowest index
        picks.append(j)
        gains.append(float(g[j]))
        objective.commit(j)
        budget.take(j)
    return picks, gains


def _top_sorted(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest finite ``values``, largest first, ties by lower index."""
    m = min(m, values.shape[0])
    idx = np.argpartition(values, values.shape[0] - m)[values.shape[0] - m :]
    idx = idx[np.lexsort((idx, -values[idx]))]
    return idx[np.isfinite(values[idx])]


def _lazy_step(objective: GainOracle, ub: np.ndarray, batch: int) -> tuple[int, float]:
    """One lazy-greedy pick from stale upper bounds ``ub`` (-inf = infeasible); refreshes ``ub``.

    Walks the candidates in decreasing bound order, evaluating blocks of ``batch`` (doubling),
    until the best fresh gain exceeds every bound not yet evaluated: then no other candidate can
    reach it, and the pick is the lowest index among the evaluated with that gain.
    """
    order = _top_sorted(ub, 4 * batch)
    bounds = ub[order]  # the stale bounds, in walk order
    best, best_gain, pos = -1, -np.inf, 0
    while True:
        if pos == order.shape[0]:  # walked past the sorted prefix: fetch the next bounds
            rest = ub.copy()
            rest[order] = -np.inf
            more = _top_sorted(rest, 4 * batch)
            if more.shape[0] == 0:
                break
            order, bounds = np.concatenate([order, more]), np.concatenate([bounds, rest[more]])
        if bounds[pos] < best_gain:  # no candidate left can reach the best fresh gain
            break
        cols = order[pos : pos + batch]
        g = objective(cols)
        ub[cols] = g
        top = g.max()
        first = int(cols[g == top].min())
        if top > best_gain or (top == best_gain and first < best):
            best, best_gain = first, float(top)
        pos += cols.shape[0]
        batch *= 2
    return best, best_gain


def lazy_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Minoux's lazy greedy with vectorised blocks of stale upper bounds; same ranking as naive.

    A stale gain is an upper bound on the current one (submodularity), so each step only
    re-evaluates, in blocks, the candidates whose bound could still beat the best fresh gain
    (``_lazy_step``); the first step uses the exact gains of ``objective.all()``.
    """
    ub = objective.all()
    ub[~budget.feasible] = -np.inf
    picks: list[int] = []
    gains: list[float] = []
    for step in range(k):
        if step == 0:
            j = int(ub.argmax())
            gain = float(ub[j])
        else:
            j, gain = _lazy_step(objective, ub, options.lazy_batch)
        picks.append(j)
        gains.append(gain)
        objective.commit(j)
        full = budget.take(j)
        ub[j] = -np.inf
        if full is not None:
            ub[budget.groups == full] = -np.inf
    return picks, gains


def stochastic_greedy(objective: GainOracle, k: int, budget: PartitionBudget, options: GreedyOptions) -> Picks:
    """Each step picks the best of a random sample of ceil(n/k ln(1/epsilon)) feasible candidates."""
    n = objective.n
    gen = options.generator if options.generator is not None else torch.Generator().manual_seed(0)
    sample_size = min(n, max(1, math.ceil(n / k * math.log(1.0 / options.epsilon))))
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        cand = np.flatnonzero(budget.feasible)
        if cand.shape[0] > sample_size:
            cand = np.sort(cand[torch.randperm(cand.shape[0], generator=gen)[:sample_size].numpy()])
        g = objective(cand)
        best = int(g.argmax())
        j = int(cand[best])
        picks.append(j)
        gains.append(float(g[best]))
        objective.commit(j)
        budget.take(j)
    return picks, gains


#: Optimisers by name. Naive and lazy greedy are exact (the same ranking; a test says so).
OPTIMIZERS: dict[str, Optimizer] = {"naive": naive_greedy, "lazy": lazy_greedy, "stochastic": stochastic_greedy}
EXACT_OPTIMIZERS = ("naive", "lazy")


def _host_array(x: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array on the host (a view for CPU float32/float64 tensors)."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.cpu().numpy()


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
        chunk_size: candidates per working block of gains (default: blocks of about 512 KB,
            so they stay in cache).

    Returns:
        Selection with ``indices`` in pick order (ties: lowest index), ``weights`` = number of
        points whose most similar medoid is each pick (CRAIG weights; a point tied between
        medoids goes to the earliest pick), ``gains`` = float64 marginal gains of F in pick
        order, and ``info`` with ``objective`` (F(S) in shifted units), ``shift``, ``method``,
        ``backend`` (``numpy-cpu``), ``device`` (of the input) and the number of gain
        ``evaluations``.

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
        chunk_size = max(1, _GAIN_BLOCK_ELEMENTS // n)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    sim = _host_array(similarity)
    shift = min(0.0, float(sim.min()))
    objective = FacilityLocationGains(sim, shift, chunk_size)
    budget = PartitionBudget.for_numpy(n, groups, budgets)
    options = GreedyOptions(lazy_batch=lazy_batch, epsilon=epsilon, generator=generator)
    picks, picked_gains = OPTIMIZERS[method](objective, k, budget, options)

    gains = torch.tensor(picked_gains, dtype=torch.float64)
    return Selection(
        indices=torch.tensor(picks, dtype=torch.long, device=similarity.device),
        weights=torch.from_numpy(objective.cluster_sizes(picks)).to(torch.get_default_dtype()).to(similarity.device),
        gains=gains,
        info={
            "solver": "facility_location",
            "backend": "numpy-cpu",
            "device": str(similarity.device),
            "method": method,
            "objective": float(gains.sum()),
            "shift": shift,
            "evaluations": objective.evaluations,
        },
    )
