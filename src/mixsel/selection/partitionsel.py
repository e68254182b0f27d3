"""PartitionSel (Agrawal, Chanda, Khatri, Ramakrishnan, Mishra & Jawanpuria, arXiv 2606.07954,
"Minibatch Selection for Language Models via Partition Matroid Constrained Gradient Matching";
docs/methods.md) and its "ID"/IWD baseline.

Per step, with per-example gradient features g_i of the pool, m validation anchor gradients v_k
and learning rate eta (features ``val_scores`` = [<g_i, v_k>] and ``gram`` K = [<g_i, g_j>]):

    s_i  = (1/m) sum_k <g_i, v_k>                     (anchor-mean score; or domain-balanced)
    s'_i = eta s_i + 1/2 eta^2 K_ii,   K' = eta^2 K    (the self-curvature diagonal is kept)
    U(w) = <w, s'> - 1/2 w^T K' w,     F(S) = max_{w >= 0, supp(w) in S} U(w)

maximised over the partition matroid |S ∩ D_d| <= k_d, sum_d k_d = k, by the matroid matching
pursuit (``mixsel.solvers.matroid_matching_pursuit``: residual-correlation shortlist of the
remaining budget per domain, one pick per step, exact NNLS refit; budgets always filled).

Computation: with u = eta w, U(w) = <u, s + 1/2 eta diag K> - 1/2 u^T K u exactly, so the solver
runs on mu = s + 1/2 eta diag(K) and K (well scaled for any eta) and returns the same picks and
utility; the reported OMP weights are w = u / eta.

``per_domain`` (PartitionSel's "ID"/IWD baseline, ``mode=iwd`` of the reference code) is the same
utility with K'_ij = 0 whenever d(i) != d(j): the problem splits into independent per-domain
problems with the same budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.seeding import Salt
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.solvers.matroid import matroid_matching_pursuit
from mixsel.types import Selection

__all__ = ["ANCHOR_MODES", "PartitionSelSelector", "PerDomainSelector", "anchor_scores", "effective_lr"]

ANCHOR_MODES = ("mean", "balanced")
MIN_LR = 1e-12


def effective_lr(pool: Pool, override: float | None = None) -> float:
    """The learning rate eta used by the utility: ``override`` or ``pool.lr``, clamped to >= 1e-12."""
    lr = float(pool.lr if override is None else override)
    if lr != lr or lr < 0:
        raise ConfigError(f"learning rate must be a non-negative number, got {lr}")
    return max(lr, MIN_LR)


def anchor_scores(pool: Pool, anchors: str = "mean") -> torch.Tensor:
    """First-order scores s_i from ``val_scores`` [n, m] (PartitionSel / GREATS).

    Args:
        pool: needs the ``val_scores`` feature; ``"balanced"`` also needs ``pool.val_domains``
            (LongTensor[m], the domain of each validation anchor).
        anchors: ``"mean"``: s_i = (1/m) sum_k <g_i, v_k> (the reference code, 2 random anchors per
            step); ``"balanced"``: s_i = (1/D') sum_d mean_{k in d} <g_i, v_k> over the D' domains
            that have anchors (the code's ``val_srcwt``: a domain-balanced validation target).

    Returns:
        Tensor[n] in float64.
    """
    if anchors not in ANCHOR_MODES:
        raise ConfigError(f"anchors={anchors!r}; choose one of {', '.join(ANCHOR_MODES)}")
    vs = pool.feature("val_scores")
    if vs.dim() == 1:
        vs = vs[:, None]
    if vs.dim() != 2 or vs.shape[0] != pool.size or vs.shape[1] == 0:
        raise ValueError(f"val_scores must be [n={pool.size}, m>=1], got shape {tuple(vs.shape)}")
    vs = vs.to(torch.float64)
    if anchors == "mean":
        return vs.mean(1)
    val_domains = getattr(pool, "val_domains", None)
    if val_domains is None:
        raise ConfigError(
            "anchors='balanced' needs the domain of each validation anchor (pool.val_domains, LongTensor[m]); "
            "use anchors='mean' or have the step attach the anchors' domain ids"
        )
    val_domains = torch.as_tensor(val_domains, dtype=torch.long).reshape(-1)
    if val_domains.numel() != vs.shape[1]:
        raise ValueError(f"pool.val_domains has {val_domains.numel()} entries but val_scores has {vs.shape[1]} anchors")
    per_domain = [vs[:, val_domains == d].mean(1) for d in torch.unique(val_domains).tolist()]
    return torch.stack(per_domain, 1).mean(1)


@register_selector("partitionsel")
class PartitionSelSelector:
    """PartitionSel: validation-guided gradient matching under per-domain budgets.

    ``Selection.weights`` are the NNLS weights w of the final refit (the natural weights of the
    method); the loss applies them only with ``selection.use_weights=true``. The reference code
    trains on the unweighted selection, which is the default (``weighted_loss = False``).

    Features: ``feature_defaults`` asks for PartitionSel's reference features, the L2-normalised
    per-example gradients of the last 3 transformer blocks (LoRA A/B under peft).

    Args:
        budget: per-domain budget policy: ``"proportional"`` (default, k_d ~ pool counts),
            ``"weights"`` (from a reweighter's domain weights), ``"fixed"`` (``shares``) or
            ``"minimum"`` (proportional with a floor of ``minimum`` per present domain).
        shares: per-domain shares for ``budget="fixed"``.
        minimum: floor for ``budget="minimum"``.
        rounding: budget rounding, ``"smallest_first"`` (the reference code), ``"largest_remainder"``
            or ``"carry"`` (remainders carried across steps, saved in ``state_dict()``;
            :func:`mixsel.selection.budgets.round_quotas`).
        randomized: pick uniformly from the residual-correlation shortlist (the reference code,
            Residual Random Greedy; randomness from ``pool.generator``). Default False: pick the
            shortlist's best (deterministic greedy; a labelled deviation, see docs/methods.md).
        anchors: ``"mean"`` or ``"balanced"`` (see :func:`anchor_scores`).
        self_curvature: keep the 1/2 eta^2 K_ii term in s' (the reference code insists on it).
        lr: override of the learning rate eta (default: the optimiser's current ``pool.lr``).
        seed_salt: salt of ``pool.generator`` for the randomised picks.
    """

    name = "partitionsel"
    requires = frozenset({"gram", "val_scores"})
    feature_defaults: ClassVar[dict[str, Any]] = {"source": "blocks", "normalize": True}
    weighted_loss = False
    block_diagonal = False

    def __init__(
        self,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
        randomized: bool = False,
        anchors: str = "mean",
        self_curvature: bool = True,
        lr: float | None = None,
        seed_salt: int = Salt.PARTITIONSEL,
    ) -> None:
        if anchors not in ANCHOR_MODES:
            raise ConfigError(f"anchors={anchors!r}; choose one of {', '.join(ANCHOR_MODES)}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"lr={lr} must be positive (or None to use the optimiser's learning rate)")
        self.budgets = BudgetPolicy.of(budget, shares, minimum, rounding=rounding)
        self.randomized = bool(randomized)
        self.anchors = anchors
        self.self_curvature = bool(self_curvature)
        self.lr = lr
        self.seed_salt = int(seed_salt)

    def utility_inputs(self, pool: Pool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mu, K, eta) of the rescaled utility U(u) = <u, mu> - 1/2 u^T K u with u = eta w."""
        gram = pool.feature("gram").to(torch.float64)
        if gram.shape != (pool.size, pool.size):
            raise ValueError(f"gram must be [n, n] with n={pool.size}, got {tuple(gram.shape)}")
        eta = effective_lr(pool, self.lr)
        mu = anchor_scores(pool, self.anchors)
        if self.self_curvature:
            mu = mu + 0.5 * eta * torch.diagonal(gram)
        if self.block_diagonal:
            same = pool.domains[:, None] == pool.domains[None, :]
            gram = torch.where(same, gram, torch.zeros((), dtype=gram.dtype))
        return mu, gram, eta

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        budgets = self.budgets.resolve(pool, k)
        mu, gram, eta = self.utility_inputs(pool)
        sol = matroid_matching_pursuit(
            mu,
            gram,
            k,
            groups=pool.domains,
            budgets=budgets,
            randomized=self.randomized,
            generator=pool.generator(self.seed_salt) if self.randomized else None,
        )
        omp_weights = sol.weights.to(torch.float64) / eta
        info: dict[str, Any] = {
            "method": self.name,
            "budgets": budgets.tolist(),
            "lr": eta,
            "utility": sol.info["utility"],
            "solver": sol.info,
        }
        return Selection(indices=sol.indices, weights=omp_weights.to(torch.float32), gains=sol.gains, info=info)

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)


@register_selector("per_domain")
class PerDomainSelector(PartitionSelSelector):
    """PartitionSel's "ID"/IWD baseline: the same utility with cross-domain interactions removed.

    K'_ij = 0 when d(i) != d(j), so U decomposes into independent per-domain gradient-matching
    problems solved under the same budgets k_d (same options as :class:`PartitionSelSelector`).
    """

    name = "per_domain"
    block_diagonal = True
