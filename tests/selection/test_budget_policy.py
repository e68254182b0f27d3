import pytest
import torch

from mixsel.selection import Pool
from mixsel.selection.budget_policy import ranked_pick, resolve_budgets


def _pool(counts, weights=None):
    domains = torch.cat([torch.full((c,), d, dtype=torch.long) for d, c in enumerate(counts)])
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    return Pool(domains=domains, num_domains=len(counts), domain_weights=w)


def test_policies_hand_values():
    # quotas 4 * [10, 1, 1] / 12 = [3.33, 0.33, 0.33] -> largest remainder gives everything to domain 0
    assert resolve_budgets(_pool([10, 1, 1]), 4, "proportional").tolist() == [4, 0, 0]
    # one guaranteed pick per present domain, the remaining 1 proportional to spare counts [9, 0, 0]
    assert resolve_budgets(_pool([10, 1, 1]), 4, "minimum", minimum=1).tolist() == [2, 1, 1]
    assert resolve_budgets(_pool([6, 3, 3]), 4, "fixed", shares=[0, 1, 1]).tolist() == [0, 2, 2]
    # weight 1.0 on a domain with 3 candidates: the 3 units it cannot use flow to the next-heaviest
    pool = _pool([6, 3, 3], weights=[0.0, 1.0, 0.0])
    assert resolve_budgets(pool, 5, "weights").tolist()[1] == 3
    assert sum(resolve_budgets(pool, 5, "weights").tolist()) == 5


def test_policy_errors():
    with pytest.raises(ValueError, match="reweighter"):
        resolve_budgets(_pool([2, 2]), 2, "weights")
    with pytest.raises(ValueError, match="shares"):
        resolve_budgets(_pool([2, 2]), 2, "fixed")
    with pytest.raises(ValueError, match="2 domains"):
        resolve_budgets(_pool([2, 2]), 2, "fixed", shares=[1.0])
    with pytest.raises(ValueError, match="proportional"):
        resolve_budgets(_pool([2, 2]), 2, "bogus")
    with pytest.raises(ValueError, match="larger than the candidate pool"):
        resolve_budgets(_pool([2, 2]), 5)


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
