"""PartitionBudget: the one partition-matroid bookkeeping every solver uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixsel.solvers._budgets import PartitionBudget, top_per_group

GROUPS = torch.tensor([0, 1, 0, 2, 1, 0])
BUDGETS = torch.tensor([2, 1, 0])


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_take_charges_the_group_and_reports_when_it_fills(backend):
    if backend == "torch":
        budget = PartitionBudget.for_torch(6, GROUPS, BUDGETS, torch.device("cpu"))
    else:
        budget = PartitionBudget.for_numpy(6, GROUPS, BUDGETS)
    assert budget.constrained
    assert budget.feasible.tolist() == [True, True, True, False, True, True]  # group 2 has budget 0
    assert budget.take(0) is None
    assert budget.feasible.tolist() == [False, True, True, False, True, True]
    assert budget.take(4) == 1  # group 1 full: item 1 goes too
    assert budget.feasible.tolist() == [False, False, True, False, False, True]
    budget.drop(2)  # a rejected candidate leaves the budget alone
    assert budget.remaining == [1, 0, 0]
    assert budget.take(5) == 0
    assert not any(budget.feasible.tolist())
    assert isinstance(budget.feasible, torch.Tensor if backend == "torch" else np.ndarray)


def test_unconstrained_budget_only_masks_picks():
    budget = PartitionBudget.for_numpy(3, None, None)
    assert not budget.constrained
    assert budget.take(1) is None
    assert budget.feasible.tolist() == [True, False, True]
    assert budget.remaining_tensor() is None


def test_top_per_group_is_the_contracted_matroid_base():
    budget = PartitionBudget.for_torch(6, GROUPS, torch.tensor([2, 1, 1]), torch.device("cpu"))
    scores = torch.tensor([5.0, 4.0, 5.0, 1.0, 9.0, 3.0])
    # group 0 keeps its best two (0 and 2, tie -> lower index first), group 1 its best (4), group 2 item 3
    assert top_per_group(scores, budget).tolist() == [4, 0, 2, 3]
    budget.take(4)
    assert top_per_group(scores, budget, limit=2).tolist() == [0, 2]
