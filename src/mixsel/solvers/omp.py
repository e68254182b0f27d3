"""Orthogonal matching pursuit for gradient matching, with optional per-group budgets.

Finds a small weighted subset whose gradient features match a target gradient:

    min_{|S| <= k, w}  ||sum_{s in S} w_s g_s - t||^2 + ridge * ||w||^2,   w >= 0 if ``nonnegative``,

the objective of GradMatch (Killamsetty et al., ICML 2021) and of PartitionSel's gradient
matching under a partition matroid. The set function F(S) = ||t||^2 - min_w (...) is not
submodular but gamma-weakly submodular, so greedy / OMP selection is within 1 - e^{-gamma} of the
optimum (Das & Kempe, JMLR 2018; Elenberg et al., Annals of Statistics 2018), gamma being the
submodularity ratio (bounded below by the restricted eigenvalues of the Gram matrix).

Each step picks the feasible candidate with the largest residual correlation c_j = <g_j, r>
(|c_j| for signed weights; only c_j > 0 for non-negative weights, as in GradMatch: a candidate
whose correlation is not positive cannot lower the residual with a non-negative weight), then
refits all weights on the support by an exact solve that reuses an incrementally extended
Cholesky factor (``mixsel.solvers._pursuit.SupportSolver``): plain least squares for signed
weights, Lawson-Hanson active-set NNLS (warm-started) for non-negative weights. Support members
whose NNLS weight becomes 0 stay selected (they count toward k and the budgets) with weight 0.

Two forms share the engine: ``omp`` on features G [n, d] and a target t [d] (correlations
computed as G (t - G_S^T w), O(nd) per step), and ``omp_kernel`` on K = G G^T, mu = G t and
||t||^2 (correlations mu - K_{:,S} w, O(n|S|) per step), which is what PartitionSel builds from
ghost inner products.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from mixsel.solvers._budgets import PartitionBudget, top_per_group
from mixsel.solvers._checks import check_finite, check_gram, check_k, check_matrix, check_partition, host_matrix
from mixsel.solvers._pursuit import SupportSolver
from mixsel.types import Selection

__all__ = ["omp", "omp_kernel"]


class _FeatureForm:
    """Correlations from features: c = G (t - G_S^T w)."""

    def __init__(self, features: torch.Tensor, target: torch.Tensor, k: int) -> None:
        self.G, self.t = features, target
        self.GS = features.new_empty(k, features.shape[1])
        self.s = 0
        self.mu = (features @ target).to(torch.float64)
        self.diag = features.pow(2).sum(1).to(torch.float64)
        self.target_sqnorm = float(target.to(torch.float64) @ target.to(torch.float64))

    def cross(self, j: int) -> torch.Tensor:
        return (self.GS[: self.s] @ self.G[j]).to(torch.float64)

    def commit(self, j: int) -> None:
        self.GS[self.s] = self.G[j]
        self.s += 1

    def correlations(self, w: torch.Tensor) -> torch.Tensor:
        r = self.t - w.to(self.G.dtype) @ self.GS[: self.s]
        return (self.G @ r).to(torch.float64)


class _KernelForm:
    """Correlations from a Gram matrix: c = mu - K_{:,S} w (rows of K_S stored contiguously)."""

    def __init__(self, gram: torch.Tensor, mu: torch.Tensor, k: int) -> None:
        self.K = gram
        self.KS = gram.new_empty(k, gram.shape[0])
        self.idx: list[int] = []
        self.mu = mu.to(torch.float64)
        self.mu_native = mu.to(gram.dtype)
        self.diag = torch.diagonal(gram).to(torch.float64)

    def cross(self, j: int) -> torch.Tensor:
        if not self.idx:
            return torch.zeros(0, dtype=torch.float64, device=self.K.device)
        sel = torch.tensor(self.idx, dtype=torch.long, device=self.K.device)
        return self.K[sel, j].to(torch.float64)

    def commit(self, j: int) -> None:
        self.KS[len(self.idx)] = self.K[:, j]
        self.idx.append(j)

    def correlations(self, w: torch.Tensor) -> torch.Tensor:
        s = len(self.idx)
        return (self.mu_native - w.to(self.K.dtype) @ self.KS[:s]).to(torch.float64)


def _check_common(ridge: float, tol: float) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")


def _pursue(
    form: _FeatureForm | _KernelForm,
    n: int,
    k: int,
    *,
    target_sqnorm: float,
    groups: torch.Tensor | None,
    budgets: torch.Tensor | None,
    nonnegative: bool,
    ridge: float,
    tol: float,
    fill: bool,
    dtype: torch.dtype,
    device: torch.device,
    form_name: str,
) -> Selection:
    engine = SupportSolver(k, ridge=ridge, nonnegative=nonnegative, device=device)
    budget = PartitionBudget.for_torch(n, groups, budgets, device)
    corr_rtol = 100 * torch.finfo(dtype).eps
    picks: list[int] = []
    gains: list[float] = []
    history = [1.0]
    rejected = 0
    res2 = target_sqnorm
    c = form.mu
    if not target_sqnorm > 0:
        warnings.warn(
            "omp: the target is zero, so there is nothing to match; returning an empty selection "
            "(or, with fill=True, k picks of weight 0).",
            RuntimeWarning,
            stacklevel=3,
        )
        stop = "zero target"
    else:
        stop = "k reached"
        scale = torch.sqrt(form.diag.clamp_min(0) * target_sqnorm)
        while len(picks) < k:
            if math.sqrt(res2 / target_sqnorm) <= tol:
                stop = "tolerance"
                break
            score = c if nonnegative else c.abs()
            score = torch.where(budget.feasible, score, torch.tensor(-math.inf, dtype=score.dtype, device=device))
            j = int(torch.argmax(score))  # ties: lowest index
            if not float(score[j]) > corr_rtol * float(scale[j]):
                stop = "no positive correlation" if nonnegative else "no correlated candidate"
                break
            engine.append(form.cross(j), float(form.diag[j]), float(form.mu[j]))
            budget.drop(j)
            if not engine.refit():
                engine.pop()  # numerically dependent on the support: cannot lower the residual
                rejected += 1
                continue
            form.commit(j)
            picks.append(j)
            budget.take(j)
            new_res2 = engine.residual_sqnorm(target_sqnorm)
            gains.append(res2 - new_res2)
            res2 = new_res2
            history.append(math.sqrt(res2 / target_sqnorm))
            c = form.correlations(engine.weights())

    weights = engine.weights().clone()
    filled = 0
    if fill and len(picks) < k:
        score = c if nonnegative else c.abs()
        extra = top_per_group(score, budget, limit=k - len(picks))
        filled = int(extra.numel())
        picks.extend(extra.tolist())
        gains.extend([0.0] * filled)
        weights = torch.cat([weights, torch.zeros(filled, dtype=weights.dtype, device=device)])
    residual = math.sqrt(res2 / target_sqnorm) if target_sqnorm > 0 else 0.0
    return Selection(
        indices=torch.tensor(picks, dtype=torch.long, device=device),
        weights=weights.to(dtype),
        gains=torch.tensor(gains, dtype=torch.float64),
        residual=residual,
        info={
            "solver": "omp",
            "backend": f"torch-{device.type}",
            "form": form_name,
            "nonnegative": nonnegative,
            "ridge": ridge,
            "residual_history": history,
            "stop_reason": stop,
            "filled": filled,
            "rejected_dependent": rejected,
            "nnls_refactorizations": engine.refactors,
        },
    )


_OMP_DOC_COMMON = """
    Budgets: with ``groups`` and ``budgets`` (a partition matroid), never more than budgets[g]
    picks come from group g; full groups are skipped.

    Stopping: before each pick the relative residual ||G_S^T w - t|| / ||t|| is compared with
    ``tol``; the loop also stops early when no feasible candidate has a positive correlation
    (non-negative weights) or a non-zero one (signed), i.e. when no pick can lower the residual.
    With ``fill=True`` the remaining slots are then filled (budgets still respected) by the
    feasible candidates of largest correlation with the final residual (|correlation| for signed
    weights; ties by lowest index), each with weight 0 and gain 0 -- this mirrors PartitionSel,
    whose loop always fills the budgets. ``info["filled"]`` counts them. A candidate that is
    numerically a linear combination of the support is skipped (``info["rejected_dependent"]``).

    Zero target (||t|| = 0): a RuntimeWarning, and an empty selection (fill=False) or k
    zero-weight picks (fill=True); ``residual`` is 0.

    Returns:
        Selection: ``indices`` in pick order; ``weights`` the fitted coefficients (exact LS / NNLS
        on the support; 0 for filled picks); ``gains`` the decrease of the squared residual norm
        at each pick; ``residual`` the final relative residual; ``info["residual_history"]`` the
        relative residual before the first and after every pick, plus ``stop_reason``.
"""


def omp(
    features: torch.Tensor,
    target: torch.Tensor,
    k: int,
    *,
    groups: torch.Tensor | Sequence[int] | None = None,
    budgets: torch.Tensor | Sequence[int] | None = None,
    nonnegative: bool = True,
    ridge: float = 0.0,
    tol: float = 1e-6,
    fill: bool = False,
) -> Selection:
    """Orthogonal matching pursuit of a target gradient by weighted per-example gradients.

    Minimises ||features[S].T @ w - target||^2 + ridge * ||w||^2 over |S| <= k (GradMatch,
    Killamsetty et al. 2021; weak-submodularity guarantee of Das & Kempe 2018 and Elenberg et
    al. 2018). See the module docstring for the algorithm.

    Args:
        features: Tensor[n, d] per-example gradient features (finite).
        target: Tensor[d] gradient to match.
        k: maximum number of picks, 1 <= k <= n.
        groups: optional LongTensor[n] of group ids.
        budgets: optional per-group maximum counts (requires ``groups``).
        nonnegative: constrain the weights to be >= 0 (GradMatch); False gives signed OMP.
        ridge: L2 penalty on the weights (>= 0).
        tol: stop once the relative residual is <= tol.
        fill: fill the remaining slots with zero-weight picks when stopping early.
    """
    features = check_matrix(features, "features")
    n, d = features.shape
    target = torch.as_tensor(target, dtype=features.dtype, device=features.device).reshape(-1)
    if target.numel() != d:
        raise ValueError(f"target has {target.numel()} entries but features have d={d} columns")
    check_finite(target, "target")
    k = check_k(k, n)
    groups, budgets = check_partition(groups, budgets, n, k)
    _check_common(ridge, tol)
    form = _FeatureForm(features, target, k)
    return _pursue(
        form,
        n,
        k,
        target_sqnorm=form.target_sqnorm,
        groups=groups,
        budgets=budgets,
        nonnegative=nonnegative,
        ridge=ridge,
        tol=tol,
        fill=fill,
        dtype=features.dtype,
        device=features.device,
        form_name="features",
    )


def omp_kernel(
    gram: torch.Tensor,
    mu: torch.Tensor,
    target_sqnorm: float,
    k: int,
    *,
    groups: torch.Tensor | Sequence[int] | None = None,
    budgets: torch.Tensor | Sequence[int] | None = None,
    nonnegative: bool = True,
    ridge: float = 0.0,
    tol: float = 1e-6,
    fill: bool = False,
) -> Selection:
    """Kernel form of ``omp``: the same picks and weights from K = G G^T, mu = G t and ||t||^2.

    A ``gram`` that is clearly not a Gram matrix (a negative diagonal entry, or asymmetry / a
    Cauchy-Schwarz violation on the rows of the first picks; ``mixsel.solvers._checks.check_gram``)
    raises a ValueError.

    Args:
        gram: Tensor[n, n] symmetric positive semi-definite Gram matrix of the features.
        mu: Tensor[n] inner products of each feature row with the target.
        target_sqnorm: ||t||^2 (>= 0), needed for the residual and the stopping rule.
        k, groups, budgets, nonnegative, ridge, tol, fill: as in ``omp``.
    """
    gram = check_matrix(gram, "gram", square=True)
    n = gram.shape[0]
    mu = torch.as_tensor(mu, device=gram.device).reshape(-1)
    if mu.numel() != n:
        raise ValueError(f"mu has {mu.numel()} entries but gram is {n} x {n}")
    check_finite(mu, "mu")
    target_sqnorm = float(target_sqnorm)
    if not (math.isfinite(target_sqnorm) and target_sqnorm >= 0):
        raise ValueError(f"target_sqnorm must be a finite number >= 0 (||t||^2), got {target_sqnorm}")
    k = check_k(k, n)
    groups, budgets = check_partition(groups, budgets, n, k)
    _check_common(ridge, tol)
    sel = _pursue(
        _KernelForm(gram, mu, k),
        n,
        k,
        target_sqnorm=target_sqnorm,
        groups=groups,
        budgets=budgets,
        nonnegative=nonnegative,
        ridge=ridge,
        tol=tol,
        fill=fill,
        dtype=gram.dtype,
        device=gram.device,
        form_name="kernel",
    )
    check_gram(host_matrix(gram, "gram"), sel.indices.tolist(), "gram")
    return sel


omp.__doc__ = (omp.__doc__ or "") + _OMP_DOC_COMMON
omp_kernel.__doc__ = (omp_kernel.__doc__ or "") + _OMP_DOC_COMMON
