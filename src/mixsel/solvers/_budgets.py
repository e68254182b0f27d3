"""Partition-matroid bookkeeping shared by every greedy solver: remaining budgets and feasibility.

A partition matroid allows at most ``budgets[g]`` picks from group g. While a solver commits
picks one at a time it needs, for each candidate, whether it may still be picked: not picked yet
and its group not full. ``PartitionBudget`` holds that mask and the per-group counts, so
``facility_location``, the pursuits and the GREATS greedy share one implementation of the rule.

The class is array-agnostic: it only indexes, compares and updates in place, so the mask and the
group ids may be torch tensors (on any device) or numpy arrays; the solvers running their inner
loop in numpy hand it numpy arrays and avoid per-pick torch overhead.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PartitionBudget", "top_per_group"]

Array = torch.Tensor | np.ndarray


class PartitionBudget:
    """Feasibility mask of a (possibly unconstrained) partition matroid, updated pick by pick.

    Attributes:
        feasible: bool[n], True where a candidate may still be picked.
        groups: int[n] group ids, or None without a constraint.
        remaining: per-group picks still allowed (a list of ints), or None.
    """

    def __init__(self, feasible: Array, groups: Array | None, budgets: Array | None) -> None:
        """Start from an all-True ``feasible`` mask and validated ``groups``/``budgets``.

        Use ``PartitionBudget.for_torch`` or ``PartitionBudget.for_numpy`` rather than this directly;
        ``budgets`` must already be clipped to the group sizes (``check_partition`` does it).
        """
        self.feasible = feasible
        self.groups = groups if budgets is not None else None
        self.remaining: list[int] | None = None
        if budgets is not None and groups is not None:
            self.remaining = [int(b) for b in budgets.tolist()]
            self.feasible &= budgets[groups] > 0

    @classmethod
    def for_torch(
        cls, n: int, groups: torch.Tensor | None, budgets: torch.Tensor | None, device: torch.device
    ) -> PartitionBudget:
        """A budget whose mask is a torch bool tensor on ``device``."""
        if budgets is not None and groups is not None:
            groups, budgets = groups.to(device), budgets.to(device)
        return cls(torch.ones(n, dtype=torch.bool, device=device), groups, budgets)

    @classmethod
    def for_numpy(cls, n: int, groups: torch.Tensor | None, budgets: torch.Tensor | None) -> PartitionBudget:
        """A budget whose mask and group ids are numpy arrays (for numpy inner loops)."""
        if budgets is None or groups is None:
            return cls(np.ones(n, dtype=bool), None, None)
        return cls(np.ones(n, dtype=bool), groups.cpu().numpy(), budgets.cpu().numpy())

    @property
    def constrained(self) -> bool:
        return self.remaining is not None

    def drop(self, j: int) -> None:
        """Mark candidate ``j`` infeasible without charging its group (e.g. a rejected pick)."""
        self.feasible[j] = False

    def take(self, j: int) -> int | None:
        """Commit the pick ``j``: mark it infeasible and charge its group.

        Returns:
            The id of the group that has just reached its budget (all its members are now
            infeasible), or None.
        """
        self.feasible[j] = False
        if self.remaining is None or self.groups is None:
            return None
        gid = int(self.groups[j])
        self.remaining[gid] -= 1
        if self.remaining[gid] > 0:
            return None
        self.feasible &= self.groups != gid
        return gid

    def remaining_tensor(self, device: torch.device | None = None) -> torch.Tensor | None:
        """The remaining budgets as a LongTensor (for ``top_per_group``), or None."""
        if self.remaining is None:
            return None
        return torch.tensor(self.remaining, dtype=torch.long, device=device)


def top_per_group(scores: torch.Tensor, budget: PartitionBudget, limit: int | None = None) -> torch.Tensor:
    """Indices of the best feasible items, at most ``remaining[g]`` from group g, best first.

    This is the max-weight independent set of the partition matroid contracted by the picks so
    far (the "shortlist" of PartitionSel: the top ``remaining[g]`` feasible items of each group by
    score). Ties go to the lower index (stable sort). ``limit`` truncates the (globally sorted)
    result. ``budget`` must hold torch tensors on the device of ``scores``.
    """
    idx = torch.nonzero(budget.feasible).reshape(-1)
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    idx = idx[order]
    remaining = budget.remaining_tensor(scores.device)
    if budget.groups is not None and remaining is not None:
        g = budget.groups[idx]
        onehot = torch.nn.functional.one_hot(g, num_classes=remaining.numel())
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # rank of each item within its group
        idx = idx[rank < remaining[g]]
    if limit is not None:
        idx = idx[:limit]
    return idx
