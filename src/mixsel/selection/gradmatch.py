"""GradMatch (Killamsetty, Sivasubramanian, Ramakrishnan, De & Iyer, ICML 2021, "GRAD-MATCH:
Gradient matching based data subset selection for efficient deep model training"), online.

Chooses k pool examples and non-negative weights whose weighted gradient matches the pool's mean
gradient, by orthogonal matching pursuit:

    min_{|S| <= k, w >= 0} || sum_{s in S} w_s g_s - gbar ||^2,     gbar = (1/n) sum_i g_i.

In kernel form (``mixsel.solvers.omp_kernel``) from the Gram matrix K = [<g_i, g_j>] only:
mu_i = <g_i, gbar> = (1/n) sum_j K_ij (``gram.mean(1)``) and ||gbar||^2 = (1/n^2) sum_ij K_ij
(``gram.mean()``). No per-domain budgets (domain-agnostic).
"""

from __future__ import annotations

from typing import Any

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool, check_k
from mixsel.solvers.omp import omp_kernel
from mixsel.types import Selection

__all__ = ["GradMatchSelector"]


@register_selector("gradmatch")
class GradMatchSelector:
    """OMP gradient matching of the pool mean gradient (GradMatch), weights = OMP coefficients.

    When the residual vanishes (or no candidate correlates positively with it) before k picks,
    the remaining slots are filled with zero-weight picks of largest residual correlation
    (``info["solver"]["filled"]``), so exactly k distinct examples are returned.

    Args:
        ridge: L2 penalty on the weights (GradMatch's lambda; 0 by default).
        tol: relative residual at which the pursuit stops matching.
    """

    name = "gradmatch"
    requires = frozenset({"gram"})

    def __init__(self, ridge: float = 0.0, tol: float = 1e-6) -> None:
        if ridge < 0:
            raise ValueError(f"ridge={ridge} must be >= 0")
        if tol < 0:
            raise ValueError(f"tol={tol} must be >= 0")
        self.ridge = float(ridge)
        self.tol = float(tol)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        gram = pool.feature("gram").to(torch.float64)
        if gram.shape != (pool.size, pool.size):
            raise ValueError(f"gram must be [n, n] with n={pool.size}, got {tuple(gram.shape)}")
        sol = omp_kernel(
            gram, gram.mean(1), float(gram.mean()), k, nonnegative=True, ridge=self.ridge, tol=self.tol, fill=True
        )
        info: dict[str, Any] = {"method": self.name, "solver": sol.info}
        return Selection(
            indices=sol.indices,
            weights=sol.weights.to(torch.float32),
            gains=sol.gains,
            residual=sol.residual,
            info=info,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
