"""GradMatch (Killamsetty, Sivasubramanian, Ramakrishnan, De & Iyer, ICML 2021, "GRAD-MATCH:
Gradient matching based data subset selection for efficient deep model training"), online.

Chooses k pool examples and non-negative weights whose weighted gradient matches the gradient of
the whole pool, by orthogonal matching pursuit:

    min_{|S| <= k, w >= 0} || sum_{s in S} w_s g_s - sum_{i in pool} g_i ||^2      (GradMatch Eq. 3)

In kernel form (``mixsel.solvers.omp_kernel``) from the Gram matrix K = [<g_i, g_j>] only:
mu_i = <g_i, sum_j g_j> = sum_j K_ij and ||sum_i g_i||^2 = sum_ij K_ij. The weights are on the
scale of the pool (they sum to about n, like CRAIG's cluster sizes), and GradMatch trains on them
(``weighted_loss = True``). No per-domain budgets (domain-agnostic).

When the pursuit stops before k picks (the residual vanished, or no candidate correlates
positively with it), the budget is filled as the reference implementation (cords) does: uniformly
random picks among the others with weight 1 (``fill="random"``, seeded by ``pool.generator``), or
with zero-weight picks of largest residual correlation (``fill="residual"``).
"""

from __future__ import annotations

from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.seeding import Salt
from mixsel.selection.base import Pool, check_k
from mixsel.solvers.omp import omp_kernel
from mixsel.types import Selection

__all__ = ["FILL_RULES", "GradMatchSelector"]

FILL_RULES = ("random", "residual")


@register_selector("gradmatch")
class GradMatchSelector:
    """OMP gradient matching of the pool gradient (GradMatch), weights = OMP coefficients.

    Args:
        ridge: L2 penalty on the weights (GradMatch's lambda; 0 by default, cords' per-example
            configs use 0.5 on their gradient scale).
        tol: relative residual at which the pursuit stops matching.
        fill: how the budget is filled when the pursuit stops early: ``"random"`` (cords: random
            picks of weight 1) or ``"residual"`` (zero-weight picks of largest residual
            correlation, ``info["solver"]["filled"]``). Exactly k distinct examples either way.
        seed_salt: salt of ``pool.generator`` for the random fill.
    """

    name = "gradmatch"
    requires = frozenset({"gram"})
    weighted_loss = True

    def __init__(
        self, ridge: float = 0.0, tol: float = 1e-6, fill: str = "random", seed_salt: int = Salt.GRADMATCH_FILL
    ) -> None:
        if ridge < 0:
            raise ConfigError(f"ridge={ridge} must be >= 0")
        if tol < 0:
            raise ConfigError(f"tol={tol} must be >= 0")
        if fill not in FILL_RULES:
            raise ConfigError(f"fill={fill!r}; choose 'random' (cords: random picks of weight 1) or 'residual'")
        self.ridge = float(ridge)
        self.tol = float(tol)
        self.fill = fill
        self.seed_salt = int(seed_salt)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        gram = pool.feature("gram").to(torch.float64)
        if gram.shape != (pool.size, pool.size):
            raise ValueError(f"gram must be [n, n] with n={pool.size}, got {tuple(gram.shape)}")
        sol = omp_kernel(
            gram,
            gram.sum(1),
            float(gram.sum()),
            k,
            nonnegative=True,
            ridge=self.ridge,
            tol=self.tol,
            fill=self.fill == "residual",
        )
        indices, weights = sol.indices, sol.weights.to(torch.float32)
        info: dict[str, Any] = {"method": self.name, "solver": sol.info, "random_fill": 0}
        missing = k - len(sol)
        if missing > 0:  # cords: uniformly random picks among the rest, weight 1
            rest = torch.ones(pool.size, dtype=torch.bool)
            rest[indices] = False
            others = torch.nonzero(rest).flatten()
            extra = others[torch.randperm(others.numel(), generator=pool.generator(self.seed_salt))[:missing]]
            indices = torch.cat([indices, extra])
            weights = torch.cat([weights, torch.ones(missing)])
            info["random_fill"] = missing
        gains = None if sol.gains is None else torch.cat([sol.gains, torch.zeros(missing, dtype=sol.gains.dtype)])
        return Selection(indices=indices, weights=weights, gains=gains, residual=sol.residual, info=info)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
