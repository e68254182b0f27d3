"""GREATS (Wang, Wu, Song, Mittal & Jia, NeurIPS 2024, "GREATS: Online Selection of High-Quality
Data for LLM Training in Every Iteration"; the greedy of its public code, docs/methods.md).

Utility of a batch S at step t: the validation-loss decrease of one SGD step on S,

    U_t(S) = l_val(theta_t) - l_val(theta_t - eta sum_{z in S} grad l(theta_t, z)),

approximated by its second-order Taylor expansion around theta_t,

    U_t(S) ~ eta sum_{i in S} <g_i, g_val> - (eta^2 / 2) sum_{i, j in S} g_i^T H_val g_j,

and maximised greedily. As in the authors' implementation (ported in PartitionSel's code), H_val is
replaced by the identity and the self terms i = j are dropped, so the greedy marginal gain of z_j
given the picks S is

    Delta_j(S) = eta <g_j, g_val> - eta^2 sum_{i in S} <g_i, g_j>,

i.e. exact greedy on U(S) = eta sum_{i in S} s_i - eta^2 sum_{i<j in S} K_ij with
s_i = mean_k <g_i, v_k> over the validation anchors (``val_scores``) and K the train Gram matrix
(``gram``), both from ghost inner products (``mixsel.solvers.greats_greedy``).
``second_order=False`` keeps only the first-order term (top-k by s_i; the paper's "first-order
only" comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.selection.partitionsel import ANCHOR_MODES, anchor_scores, effective_lr
from mixsel.selection.ranked import ranked_pick
from mixsel.solvers.matroid import greats_greedy
from mixsel.types import Selection

__all__ = ["GreatsSelector"]


@register_selector("greats")
class GreatsSelector:
    """GREATS greedy with the learning-rate-scaled interaction penalty.

    Features: ``feature_defaults`` asks for the features of GREATS as ported in PartitionSel's code
    (L2-normalised gradients of the last 3 transformer blocks); the GREATS code itself uses every
    LoRA layer, unnormalised (``selection.features.blocks=0``, ``normalize=false``; docs/methods.md).

    Args:
        second_order: include the -eta^2 <g_i, g_j> interaction term (default True).
        anchors: ``"mean"`` (reference code) or ``"balanced"`` validation score (see
            :func:`mixsel.selection.partitionsel.anchor_scores`).
        lr: override of eta (default: the optimiser's current ``pool.lr``, clamped to >= 1e-12).
        per_domain_budgets: cap picks per domain (partition-matroid variant; default False as in
            GREATS).
        budget, shares, minimum, rounding: budget policy (see
            :class:`~mixsel.selection.budgets.BudgetPolicy`).
    """

    name = "greats"
    requires = frozenset({"gram", "val_scores"})
    feature_defaults: ClassVar[dict[str, Any]] = {"source": "blocks", "normalize": True}
    weighted_loss = False

    def __init__(
        self,
        second_order: bool = True,
        anchors: str = "mean",
        lr: float | None = None,
        per_domain_budgets: bool = False,
        budget: str = "proportional",
        shares: Sequence[float] | None = None,
        minimum: int = 1,
        rounding: str = "smallest_first",
    ) -> None:
        if anchors not in ANCHOR_MODES:
            raise ConfigError(f"anchors={anchors!r}; choose one of {', '.join(ANCHOR_MODES)}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"lr={lr} must be positive (or None to use the optimiser's learning rate)")
        self.second_order = bool(second_order)
        self.anchors = anchors
        self.lr = lr
        self.budgets = BudgetPolicy.of(budget, shares, minimum, enabled=per_domain_budgets, rounding=rounding)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        scores = anchor_scores(pool, self.anchors)
        eta = effective_lr(pool, self.lr)
        info: dict[str, Any] = {"method": self.name, "lr": eta}
        groups, budgets = self.budgets.constraint(pool, k, info)
        if not self.second_order:
            indices = ranked_pick(scores, k, groups=groups, budgets=budgets)
            return Selection.uniform(indices, gains=eta * scores[indices], info=info)
        gram = pool.feature("gram").to(torch.float64)
        sol = greats_greedy(scores, gram, k, lr=eta, groups=groups, budgets=budgets)
        info["solver"] = sol.info
        return Selection(indices=sol.indices, weights=torch.ones(len(sol)), gains=sol.gains, info=info)

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)
