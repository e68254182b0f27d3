"""ranked_pick: the k best scores, ties to the lowest index, optionally within per-domain budgets."""

import pytest
import torch

from mixsel.selection.ranked import ranked_pick


def test_ranked_pick_ties_lowest_index_and_budgets():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert ranked_pick(scores, 3).tolist() == [1, 2, 4]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    got = ranked_pick(scores, 3, groups=groups, budgets=torch.tensor([1, 2]))
    assert got.tolist() == [1, 4, 3]  # top-1 of group 0, top-2 of group 1, in global score order
    with pytest.raises(ValueError, match="NaN"):
        ranked_pick(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="groups"):
        ranked_pick(scores, 2, budgets=torch.tensor([1, 1]))
