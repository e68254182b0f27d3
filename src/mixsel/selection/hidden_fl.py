"""Facility location on hidden states (Bhatt et al., 2024, "An experimental design framework for
label-efficient supervised finetuning of LLMs"), adapted to online selection as in CoLM
(Nguyen et al., ICLR 2025, Table 1 "FL").

Picks k representative examples of the pool by greedy facility location on the cosine similarity
of the model's mean-pooled last hidden states h_i (feature ``hidden``):

    F(S) = sum_{i in V} max_{s in S} cos(h_i, h_s)    (shifted to be non-negative by the solver).

``Selection.weights`` are the cluster sizes of the medoids; the method trains unweighted
(``selection.use_weights=true`` applies them, CRAIG-style).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixsel.registry import register_selector
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.solvers.facility_location import facility_location
from mixsel.types import Selection

__all__ = ["HiddenFacilityLocationSelector", "cosine_similarity_matrix"]


def cosine_similarity_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``x`` [n, H] (zero rows are similar to nothing)."""
    if x.dim() != 2:
        raise ValueError(f"expected a [n, H] matrix of features, got shape {tuple(x.shape)}")
    x = x.to(torch.float64) if x.dtype == torch.float64 else x.to(torch.float32)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    return unit @ unit.T


@register_selector("hidden_fl")
class HiddenFacilityLocationSelector:
    """Representative examples by facility location on cosine similarity of hidden states.

    Args:
        per_domain_budgets: if True, at most k_d picks per domain under the ``budget`` policy
            (default False: the paper's domain-agnostic FL).
        budget, shares, minimum, rounding: budget policy (see
            :class:`~mixsel.selection.budgets.BudgetPolicy`).
    """

    name = "hidden_fl"
    requires = frozenset({"hidden"})
    weighted_loss = False

    def __init__(
        self,
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
    ) -> None:
        self.budgets = BudgetPolicy.of(budget, shares, minimum, enabled=per_domain_budgets, rounding=rounding)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        similarity = cosine_similarity_matrix(pool.feature("hidden"))
        info: dict[str, Any] = {"method": self.name}
        groups, budgets = self.budgets.constraint(pool, k, info)
        sel = facility_location(similarity, k, groups=groups, budgets=budgets)
        info["solver"] = sel.info
        return Selection(indices=sel.indices, weights=sel.weights, gains=sel.gains, info=info)

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)
