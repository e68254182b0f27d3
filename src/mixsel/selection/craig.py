"""CRAIG (Mirzasoleiman, Bilmes & Leskovec, ICML 2020, "Coresets for data-efficient training of
machine learning models"): weighted medoids of the per-example gradients.

CRAIG picks the k medoids S of the pool in gradient space by greedy facility location,

    F(S) = sum_{i in V} max_{s in S} [C - d_is],     d_ij = ||g_i - g_j||     (CRAIG Eq. 8-9; CoLM Eq. 2)

and weights each medoid by the size of its cluster (the number of pool examples whose closest
medoid it is), so that sum_s w_s g_s approximates the pool gradient sum_i g_i; CRAIG trains on
these weights (``weighted_loss = True``). Distances come from the Gram matrix
K_ij = <g_i, g_j> without materialising gradients:

    d_ij = sqrt(max(K_ii + K_jj - 2 K_ij, 0)),    C = max_ij d_ij.

The paper bounds the gradient error by Euclidean distances (the default); the cords
implementation uses squared Euclidean distances (``distance="squared"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.solvers.facility_location import facility_location, similarity_from_distance
from mixsel.types import Selection

__all__ = ["DISTANCES", "CraigSelector", "distances_from_gram"]

DISTANCES = ("euclidean", "squared")


def distances_from_gram(gram: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """Euclidean distances d_ij = sqrt(K_ii + K_jj - 2 K_ij) from a Gram matrix (clamped at 0).

    Args:
        gram: Tensor[n, n] of inner products K_ij = <g_i, g_j>.
        squared: return the squared distances K_ii + K_jj - 2 K_ij instead.

    Returns:
        Tensor[n, n] of distances with an exact zero diagonal.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [n, n] matrix, got shape {tuple(gram.shape)}")
    k = gram.to(torch.float64)
    diag = torch.diagonal(k)
    sq = (diag[:, None] + diag[None, :] - 2.0 * k).clamp_min(0.0)
    sq = 0.5 * (sq + sq.T)  # exact symmetry despite rounding
    sq.fill_diagonal_(0.0)
    out = sq if squared else sq.sqrt()
    return out.to(gram.dtype if gram.is_floating_point() else torch.float32)


@register_selector("craig")
class CraigSelector:
    """Weighted facility-location medoids of the gradients (CRAIG).

    Args:
        distance: ``"euclidean"`` (the paper, default) or ``"squared"`` (cords).
        per_domain_budgets: if True, at most k_d medoids per domain (partition matroid) under the
            ``budget`` policy; by default the medoids are chosen over the whole pool as in CRAIG.
        budget, shares, minimum, rounding: budget policy (see
            :class:`~mixsel.selection.budgets.BudgetPolicy`).
        method: facility-location greedy variant (``"lazy"``, same ranking as ``"naive"``).

    ``Selection.weights`` are the cluster sizes (they sum to n, the pool size).
    """

    name = "craig"
    requires = frozenset({"gram"})
    weighted_loss = True

    def __init__(
        self,
        distance: str = "euclidean",
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
        method: str = "lazy",
    ) -> None:
        if method not in ("lazy", "naive"):
            raise ConfigError(f"method={method!r}; choose 'lazy' or 'naive' (both give the same medoids)")
        if distance not in DISTANCES:
            raise ConfigError(f"distance={distance!r}; choose 'euclidean' (CRAIG paper) or 'squared' (cords)")
        self.distance = distance
        self.budgets = BudgetPolicy.of(budget, shares, minimum, enabled=per_domain_budgets, rounding=rounding)
        self.method = method

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        dist = distances_from_gram(pool.feature("gram"), squared=self.distance == "squared")
        similarity = similarity_from_distance(dist)
        info: dict[str, Any] = {"method": self.name, "distance": self.distance}
        groups, budgets = self.budgets.constraint(pool, k, info)
        sel = facility_location(similarity, k, groups=groups, budgets=budgets, method=self.method)  # type: ignore[arg-type]
        info["solver"] = sel.info
        return Selection(indices=sel.indices, weights=sel.weights, gains=sel.gains, info=info)

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)
