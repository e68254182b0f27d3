"""PartitionSel's partition-matroid pursuit and the GREATS greedy, as pure tensor functions.

Both take per-candidate scores s and a Gram matrix K of gradient features (PartitionSel:
s'_i = eta <g_i, v> + eta^2 K_ii / 2 and K' = eta^2 K; GREATS: <g_i, g_val> and K); the selectors
build those inputs, these functions only optimise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mixsel.solvers._budgets import PartitionBudget, top_per_group
from mixsel.solvers._checks import check_finite, check_gram, check_k, check_matrix, check_partition, host_matrix
from mixsel.solvers._pursuit import SupportSolver
from mixsel.solvers.omp import _KernelForm
from mixsel.types import Selection

__all__ = ["greats_greedy", "matroid_matching_pursuit"]

_HOST_DTYPES = (torch.float32, torch.float64)


def _check_scores_gram(scores: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gram = check_matrix(gram, "gram", square=True)
    scores = torch.as_tensor(scores, device=gram.device).reshape(-1)
    if scores.numel() != gram.shape[0]:
        raise ValueError(f"scores has {scores.numel()} entries but gram is {gram.shape[0]} x {gram.shape[0]}")
    check_finite(scores, "scores")
    return scores.to(gram.dtype), gram


def _host_scores(scores: torch.Tensor, dtype: torch.dtype, acc: np.dtype, n: int) -> np.ndarray:
    """``scores`` as a finite host array of dtype ``acc`` (rounded through the Gram's ``dtype`` first)."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    out = scores.detach().reshape(-1)
    if out.shape[0] != n:
        raise ValueError(f"scores has {out.shape[0]} entries but gram is {n} x {n}")
    if out.dtype != dtype:
        out = out.to(dtype)
    host = out.cpu().numpy() if out.dtype in _HOST_DTYPES else out.float().cpu().numpy()
    if not np.isfinite(host).all():
        check_finite(out, "scores")
    return host if host.dtype == acc else host.astype(acc)


def matroid_matching_pursuit(
    scores: torch.Tensor,
    gram: torch.Tensor,
    k: int,
    *,
    groups: torch.Tensor | Sequence[int] | None = None,
    budgets: torch.Tensor | Sequence[int] | None = None,
    randomized: bool = False,
    generator: torch.Generator | None = None,
    ridge: float = 0.0,
) -> Selection:
    """PartitionSel's gradient-matching pursuit under a partition matroid (arXiv 2606.07954).

    Maximises the set utility F(S) = max_{w >= 0, supp(w) in S} U(w) with
    U(w) = <w, s> - 1/2 w^T K w over |S ∩ group g| <= budgets[g], |S| = k. Each of the k steps:

    1. proxy = grad U(w) = s - K w (the residual correlation of OMP);
    2. shortlist = for every group, the ``remaining[g]`` feasible candidates of largest proxy
       (ties: lower index) -- the max-weight base of the contracted partition matroid;
    3. ``randomized=True``: pick uniformly from the shortlist (Residual Random Greedy, Chen,
       Feldman & Karbasi, ICML 2018, which is within a constant factor of the optimum for
       gamma-weakly submodular F under a matroid, as in PartitionSel's code);
       ``randomized=False`` (deterministic deviation): pick the shortlist's best proxy, i.e. the
       greedy step, which carries the 1/2-type matroid-greedy guarantee only for submodular F
       (Fisher et al. 1978) and a gamma-dependent one for weakly submodular F;
    4. refit w by exact NNLS on the support (Lawson-Hanson active set on the k x k system; the
       original code runs 128 FISTA steps from a random start instead).

    The loop always runs k steps (PartitionSel fills its budgets): picks with a non-positive
    proxy keep weight 0. By the substitution u = eta w this is non-negative matching of the
    validation gradient (Das & Kempe 2018; Elenberg et al. 2018 for the weak submodularity).

    Args:
        scores: Tensor[n] linear utility terms s (e.g. s'_i of PartitionSel).
        gram: Tensor[n, n] symmetric PSD interaction matrix K (keep its diagonal).
        k: number of picks, 1 <= k <= n.
        groups: optional LongTensor[n] group (domain) ids.
        budgets: optional per-group maximum counts (requires ``groups``).
        randomized: Residual Random Greedy pick (needs ``generator`` for reproducibility; a
            fixed seed 0 is used when None).
        generator: torch.Generator for the random picks.
        ridge: optional L2 term added to K's diagonal in the refit (0 = as in the paper).

    Returns:
        Selection with ``indices`` in pick order, ``weights`` the NNLS weights w (some may be 0),
        ``gains`` the increase of U at each pick, ``info["utility"]`` the final F(S).

    Raises:
        ValueError: bad shapes, non-finite ``scores`` or ``gram``, bad ``k``, ``groups``,
            ``budgets`` or ``ridge``, or a ``gram`` that is clearly not a Gram matrix: a negative
            diagonal entry, or asymmetry / a Cauchy-Schwarz violation on the rows of the first
            picks (``mixsel.solvers._checks.check_gram``; O(n), no eigendecomposition).
    """
    scores, gram = _check_scores_gram(scores, gram)
    n = gram.shape[0]
    k = check_k(k, n)
    groups, budgets = check_partition(groups, budgets, n, k)
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = gram.device
    form = _KernelForm(gram, scores, k)
    engine = SupportSolver(k, ridge=ridge, nonnegative=True, device=device)
    budget = PartitionBudget.for_torch(n, groups, budgets, device)
    picks: list[int] = []
    gains: list[float] = []
    utility = 0.0
    proxy = form.mu
    neg_inf = torch.tensor(-math.inf, dtype=proxy.dtype, device=device)
    for step in range(k):
        if randomized:
            shortlist = top_per_group(proxy, budget, limit=None if groups is not None else k - step)
            j = int(shortlist[int(torch.randint(shortlist.numel(), (1,), generator=gen))])
        else:  # the shortlist's head, without building it: the feasible maximum, lowest index first
            j = int(torch.argmax(torch.where(budget.feasible, proxy, neg_inf)))
        engine.append(form.cross(j), float(form.diag[j]), float(form.mu[j]))
        engine.refit()  # the pick stays in S even with weight 0 (budgets are always filled)
        form.commit(j)
        picks.append(j)
        budget.take(j)
        new_utility = engine.utility()
        gains.append(new_utility - utility)
        utility = new_utility
        proxy = form.correlations(engine.weights())
    check_gram(host_matrix(gram, "gram"), picks, "gram")
    return Selection(
        indices=torch.tensor(picks, dtype=torch.long, device=device),
        weights=engine.weights().clone().to(gram.dtype),
        gains=torch.tensor(gains, dtype=torch.float64),
        info={
            "solver": "matroid_matching_pursuit",
            "backend": f"torch-{device.type}",
            "randomized": randomized,
            "utility": utility,
            "nnls_refactorizations": engine.refactors,
        },
    )


def greats_greedy(
    scores: torch.Tensor,
    gram: torch.Tensor,
    k: int,
    *,
    lr: float = 1.0,
    groups: torch.Tensor | Sequence[int] | None = None,
    budgets: torch.Tensor | Sequence[int] | None = None,
) -> Selection:
    """GREATS greedy batch selection (Wang et al., NeurIPS 2024; docs/methods.md, greats).

    Exact greedy maximisation of the second-order Taylor utility of one SGD step

        U(S) = lr * sum_{i in S} s_i - lr^2 * sum_{i < j in S} K_ij,

    with s_i = <g_i, g_val> and K_ij = <g_i, g_j> (validation Hessian replaced by the identity,
    self terms dropped, as in the reference code): start with score_j = lr * s_j; repeat k
    times: pick the feasible argmax (ties: lowest index), then score_j -= lr^2 * K[pick, j].
    U is a modular term minus a quadratic one: it is submodular only when K_ij >= 0 off the
    diagonal and need not be monotone, so no approximation factor is claimed in general; this is
    the published heuristic. With ``groups``/``budgets`` a group at
    its budget is skipped (partition-matroid variant).

    Args:
        scores: Tensor[n] first-order scores <g_i, g_val>.
        gram: Tensor[n, n] inner products <g_i, g_j>.
        k: number of picks, 1 <= k <= n.
        lr: learning rate eta (> 0); the redundancy penalty scales as lr relative to the scores.
        groups: optional LongTensor[n] group ids.
        budgets: optional per-group maximum counts (requires ``groups``).

    Returns:
        Selection with unit weights, ``gains`` = the marginal utility of each pick; the greedy
        runs as a numpy loop on the host (``info["backend"] = "numpy-cpu"``; a CUDA ``gram`` is
        copied once and the indices come back on its device).

    Raises:
        ValueError: bad shapes, non-finite ``scores`` or ``gram``, bad ``k``, ``lr``, ``groups``
            or ``budgets``, or a ``gram`` that is clearly not a Gram matrix (as in
            ``matroid_matching_pursuit``).
    """
    host = host_matrix(gram, "gram", square=True)
    n = host.shape[0]
    dtype = gram.dtype if gram.is_floating_point() else torch.get_default_dtype()
    host_scores = _host_scores(scores, dtype, host.dtype, n)
    k = check_k(k, n)
    groups, budgets = check_partition(groups, budgets, n, k)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    current = host_scores * lr
    if not np.isfinite(host).all():
        check_finite(gram, "gram")
    budget = PartitionBudget.for_numpy(n, groups, budgets) if budgets is not None else None
    picks, gains = _greats_loop(current, host, k, lr * lr, budget)
    check_gram(host, picks, "gram")
    indices, weights = torch.from_numpy(picks), torch.ones(k, dtype=dtype)
    on_cpu = gram.is_cpu
    if not on_cpu:
        indices, weights = indices.to(gram.device), weights.to(gram.device)
    return Selection(
        indices=indices,
        weights=weights,
        gains=torch.from_numpy(gains),
        info={
            "solver": "greats_greedy",
            "backend": "numpy-cpu",
            "device": "cpu" if on_cpu else str(gram.device),
            "lr": lr,
            "utility": sum(gains.tolist()),
        },
    )


def _greats_loop(
    current: np.ndarray, gram: np.ndarray, k: int, penalty: float, budget: PartitionBudget | None
) -> tuple[np.ndarray, np.ndarray]:
    """The GREATS greedy on host arrays: k times, pick the argmax and subtract ``penalty * gram[j]``.

    A plain numpy loop of three small operations per pick (a torch loop paid ~10 us of dispatch
    per operation at n = 64-512). Masked entries of ``current`` hold -inf, so a pick is one argmax
    (ties: the first maximum, the lowest index) and a full group is masked once. When the picks
    touch a large part of the Gram it is scaled once (the same products as row by row), with +inf
    on the diagonal, so that subtracting row j also masks j.
    """
    if budget is not None:
        current[~budget.feasible] = -np.inf
    scaled = None
    if 8 * k >= gram.shape[0]:
        scaled = gram * penalty
        np.fill_diagonal(scaled, np.inf)
    argmax, subtract = current.argmax, current.__isub__
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        j = int(argmax())
        picks.append(j)
        gains.append(float(current[j]))
        if scaled is not None:
            subtract(scaled[j])
        else:
            subtract(gram[j] * penalty)
            current[j] = -np.inf
        if budget is not None and (full := budget.take(j)) is not None:
            current[budget.groups == full] = -np.inf
    return np.array(picks, dtype=np.int64), np.array(gains, dtype=np.float64)
