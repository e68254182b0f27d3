"""Baselines that ignore the model: uniform random and per-domain stratified random selection."""

from __future__ import annotations

from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_selector
from mixsel.seeding import Salt
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import BudgetPolicy
from mixsel.types import Selection

__all__ = ["RandomSelector", "StratifiedSelector"]


class _Stateless:
    requires: frozenset[str] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@register_selector("random")
class RandomSelector(_Stateless):
    """Uniformly random k of the n candidates (the standard minibatch, when k = n it keeps all).

    Randomness comes from ``pool.generator()`` so every rank draws the same subset.
    """

    name = "random"

    def __init__(self, seed_salt: int = Salt.RANDOM) -> None:
        self.seed_salt = int(seed_salt)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        perm = torch.randperm(pool.size, generator=pool.generator(self.seed_salt))
        return Selection.uniform(perm[:k], info={"method": self.name})


@register_selector("stratified")
class StratifiedSelector(_Stateless):
    """Per-domain stratified random selection.

    Each domain d gets a budget k_d proportional to its count in the pool (``budget="weights"``
    follows ``pool.domain_weights`` instead, e.g. from a reweighter; ``"uniform"`` gives every
    present domain an equal share), and k_d of its candidates are drawn uniformly at random.

    Args:
        budget: ``"proportional"`` (default) or ``"weights"`` or ``"uniform"`` (equal shares, capped
            by availability).
        minimum: floor on each present domain's budget (proportional mode).
        rounding: budget rounding (:func:`mixsel.selection.budgets.round_quotas`); ``"carry"``
            carries each domain's remainder across steps (saved in ``state_dict()``), so with fewer
            picks than domains every domain still gets its share over the steps.
    """

    name = "stratified"

    def __init__(
        self,
        budget: str = "proportional",
        minimum: int = 0,
        rounding: str = "smallest_first",
        seed_salt: int = Salt.STRATIFIED,
    ) -> None:
        if budget not in {"proportional", "weights", "uniform"}:
            raise ConfigError(f"budget={budget!r}; choose proportional, weights or uniform")
        # a positive floor turns the proportional split into the "minimum" policy
        policy = "minimum" if budget == "proportional" and minimum > 0 else budget
        self.budgets = BudgetPolicy(policy, minimum=minimum, rounding=rounding)
        self.seed_salt = int(seed_salt)

    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        budgets = self.budgets.resolve(pool, k)
        g = pool.generator(self.seed_salt)
        picks = []
        for d in range(pool.num_domains):
            members = torch.nonzero(pool.domains == d).flatten()
            if budgets[d] == 0:
                continue
            order = torch.randperm(members.numel(), generator=g)
            picks.append(members[order[: int(budgets[d])]])
        indices = torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)
        return Selection.uniform(indices, info={"method": self.name, "budgets": budgets.tolist()})

    def state_dict(self) -> dict[str, Any]:
        """``{"budget_carry": [...]}`` under ``rounding="carry"`` (see ``BudgetPolicy.state_dict``), else ``{}``."""
        return self.budgets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets.load_state_dict(state)
