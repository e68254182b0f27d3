import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsel.selection import Pool
from mixsel.selection.budgets import BudgetPolicy, budgets_from_weights, proportional_budgets, round_quotas


def test_proportional_hand_computed():
    # quotas 5*[3,2,5]/10 = [1.5, 1.0, 2.5] -> floors [1,1,2]; the reference code gives the spare unit
    # to the smallest floor (tie between domains 0 and 1 -> lower id); largest remainder gives it to
    # the largest fraction (0.5 tie between domains 0 and 2; larger quota wins -> domain 2)
    assert proportional_budgets(torch.tensor([3, 2, 5]), 5).tolist() == [2, 1, 2]
    assert proportional_budgets(torch.tensor([3, 2, 5]), 5, rounding="largest_remainder").tolist() == [1, 1, 3]
    assert proportional_budgets(torch.tensor([10, 0, 10]), 4).tolist() == [2, 0, 2]


def test_official_rounding_of_the_issue_example():
    # counts [7, 51, 6], k = 5: quotas [0.55, 3.98, 0.47] -> floors [0, 3, 0]; the 2 leftover units go to
    # the smallest floors (domains 0 and 2) -> [1, 3, 1]; largest remainder: [1, 4, 0]
    counts = torch.tensor([7, 51, 6])
    assert proportional_budgets(counts, 5).tolist() == [1, 3, 1]
    assert proportional_budgets(counts, 5, rounding="largest_remainder").tolist() == [1, 4, 0]
    assert BudgetPolicy(rounding="largest_remainder").resolve(_pool([7, 51, 6]), 5).tolist() == [1, 4, 0]


def test_smallest_first_cycles_the_fixed_order_and_skips_full_domains():
    # floors [0, 0, 5] of quotas [0.4, 0.4, 5.2], 1 unit left: domain 0 (smallest floor, lowest id)
    assert round_quotas(torch.tensor([0.4, 0.4, 5.2]), 6, torch.tensor([9, 9, 9])).tolist() == [1, 0, 5]
    # quotas capped at [1, 9, 9] -> floors [1, 2, 2]; 2 units: domain 0 is full, so 1 then 2
    assert round_quotas(torch.tensor([1.9, 2.6, 2.5]), 7, torch.tensor([1, 9, 9])).tolist() == [1, 3, 3]
    # a zero quota never takes units while a positive-quota domain has room
    assert round_quotas(torch.tensor([0.0, 2.5, 2.5]), 5, torch.tensor([9, 9, 9])).tolist() == [0, 3, 2]
    with pytest.raises(ValueError, match="rounding='nearest'"):
        round_quotas(torch.tensor([1.0]), 1, torch.tensor([1]), "nearest")


def test_minimum_floor():
    assert proportional_budgets(torch.tensor([20, 1, 1]), 4, minimum=1).tolist() == [2, 1, 1]


def test_weights_overflow_goes_to_others():
    # domain 1 would get 6 by weight but holds only 2 candidates
    b = budgets_from_weights(torch.tensor([10, 2, 10]), 8, torch.tensor([0.1, 0.8, 0.1]))
    assert b.tolist()[1] == 2 and int(b.sum()) == 8


def test_errors():
    with pytest.raises(ValueError, match="larger than the pool"):
        proportional_budgets(torch.tensor([1, 1]), 3)
    with pytest.raises(ValueError, match="not all zero"):
        budgets_from_weights(torch.tensor([1, 1]), 1, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="domains"):
        budgets_from_weights(torch.tensor([1, 1]), 1, torch.tensor([1.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.data())
def test_budget_properties(counts, data):
    counts_t = torch.tensor(counts)
    total = int(counts_t.sum())
    if total == 0:
        return
    k = data.draw(st.integers(1, total))
    w = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(counts), max_size=len(counts))))
    for rounding in ("smallest_first", "largest_remainder"):
        b = proportional_budgets(counts_t, k, rounding=rounding)
        assert int(b.sum()) == k
        assert bool((b >= 0).all() and (b <= counts_t).all())
        b2 = budgets_from_weights(counts_t, k, w, rounding=rounding)
        assert int(b2.sum()) == k and bool((b2 <= counts_t).all())


def _pool(counts, weights=None):
    domains = torch.cat([torch.full((c,), d, dtype=torch.long) for d, c in enumerate(counts)])
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    return Pool(domains=domains, num_domains=len(counts), domain_weights=w)


def test_budget_policies_hand_values():
    # quotas 4 * [10, 1, 1] / 12 = [3.33, 0.33, 0.33] -> floors [3, 0, 0], the spare unit to domain 1
    # (smallest floor, lowest id); largest remainder gives everything to domain 0
    assert BudgetPolicy("proportional").resolve(_pool([10, 1, 1]), 4).tolist() == [3, 1, 0]
    assert BudgetPolicy("proportional", rounding="largest_remainder").resolve(_pool([10, 1, 1]), 4).tolist() == [
        4,
        0,
        0,
    ]
    # one guaranteed pick per present domain, the remaining 1 proportional to spare counts [9, 0, 0]
    assert BudgetPolicy("minimum").resolve(_pool([10, 1, 1]), 4).tolist() == [2, 1, 1]
    assert BudgetPolicy("fixed", shares=[0, 1, 1]).resolve(_pool([6, 3, 3]), 4).tolist() == [0, 2, 2]
    # weight 1.0 on a domain with 3 candidates: the 3 units it cannot use flow to the next-heaviest
    pool = _pool([6, 3, 3], weights=[0.0, 1.0, 0.0])
    assert BudgetPolicy("weights").resolve(pool, 5).tolist()[1] == 3
    assert sum(BudgetPolicy("weights").resolve(pool, 5).tolist()) == 5


def test_budget_policy_errors():
    with pytest.raises(ValueError, match="reweighter"):
        BudgetPolicy("weights").resolve(_pool([2, 2]), 2)
    with pytest.raises(ValueError, match="shares"):
        BudgetPolicy("fixed").resolve(_pool([2, 2]), 2)
    with pytest.raises(ValueError, match="2 domains"):
        BudgetPolicy("fixed", shares=[1.0]).resolve(_pool([2, 2]), 2)
    with pytest.raises(ValueError, match="proportional"):
        BudgetPolicy("bogus").resolve(_pool([2, 2]), 2)
    with pytest.raises(ValueError, match="smallest_first"):
        BudgetPolicy(rounding="bogus")
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        BudgetPolicy().resolve(_pool([2, 2]), 5)


def test_budget_policy_uniform_and_constraint():
    # equal shares over the present domains; units the small domain cannot use flow to the others
    assert BudgetPolicy("uniform").resolve(_pool([6, 1, 3]), 6).tolist() == [3, 1, 2]
    info: dict = {}
    groups, budgets = BudgetPolicy().constraint(_pool([3, 1]), 2, info)
    assert groups.tolist() == [0, 0, 0, 1] and budgets.tolist() == info["budgets"] == [1, 1]
    assert BudgetPolicy(enabled=False).constraint(_pool([3, 1]), 2, info) == (None, None)
    with pytest.raises(ValueError, match="minimum"):
        BudgetPolicy("minimum", minimum=-1)


def test_fewer_picks_than_domains_warns_once_and_suggests_carry(caplog, monkeypatch):
    import mixsel.selection.budgets as budgets

    monkeypatch.setattr(budgets, "_WARNED_SMALL_K", set())
    pool = _pool([5, 1, 1, 9])
    with caplog.at_level("WARNING", logger="mixsel.selection.budgets"):
        # quotas 3*[5,1,1,9]/16 = [0.94, 0.19, 0.19, 1.69] -> floors [0, 0, 0, 1]; the 2 leftover
        # units go by domain id to domains 0 and 1, not to the larger domain 3
        assert BudgetPolicy().resolve(pool, 3).tolist() == [1, 1, 0, 1]
        BudgetPolicy().resolve(pool, 3)
        BudgetPolicy(rounding="carry").resolve(pool, 2)  # carried remainders: no warning
        BudgetPolicy().resolve(pool, 4)  # k = number of domains: no warning
        # largest_remainder starves the small domains too: warned (once per k and domains)
        BudgetPolicy(rounding="largest_remainder").resolve(pool, 1)
    warned = [r.getMessage() for r in caplog.records if "leftover picks to the domains that sort" in r.getMessage()]
    assert len(warned) == 2 and "k=3 picks over 4 domains: smallest_first" in warned[0]
    assert "k=1 picks over 4 domains: largest_remainder" in warned[1]
    assert all("never trained" in m and "{rounding: carry}" in m and "\n" not in m for m in warned)


def test_the_small_k_warning_sits_in_round_quotas_so_direct_callers_get_it(caplog, monkeypatch):
    # CoLM calls proportional_budgets directly (its big sources), not through a BudgetPolicy
    import mixsel.selection.budgets as budgets

    monkeypatch.setattr(budgets, "_WARNED_SMALL_K", set())
    with caplog.at_level("WARNING", logger="mixsel.selection.budgets"):
        assert proportional_budgets(torch.tensor([5, 1, 1, 9]), 2).tolist() == [1, 0, 0, 1]
    assert any("k=2 picks over 4 domains" in r.getMessage() for r in caplog.records)
