"""rounding="carry": per-domain remainders carried across steps (mixsel.selection.budgets.QuotaCarry)."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsel import get_selector
from mixsel.selection import Pool
from mixsel.selection.budgets import (
    CARRY_KEY,
    ROUNDINGS,
    BudgetPolicy,
    QuotaCarry,
    budgets_from_weights,
    proportional_budgets,
    round_quotas,
)

QUOTAS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
BIG = torch.tensor([100, 100, 100])


def _run(carry: QuotaCarry, quota: torch.Tensor, k: int, caps: torch.Tensor, steps: int) -> list[list[int]]:
    return [round_quotas(quota, k, caps, "carry", carry).tolist() for _ in range(steps)]


def test_carry_keeps_every_domain_within_one_pick_of_its_cumulative_quota():
    carry = QuotaCarry()
    counts = torch.zeros(3, dtype=torch.float64)
    for t in range(1, 1001):
        budgets = round_quotas(QUOTAS, 1, BIG, "carry", carry)
        assert budgets.sum() == 1
        counts += budgets
        assert ((counts - t * QUOTAS).abs() < 1).all(), (t, counts.tolist())
    assert counts.tolist() == [500.0, 300.0, 200.0]
    # one period: carries (-.5, .3, .2) -> (0, -.4, .4) -> (.5, -.1, -.4) -> ... -> (0, 0, 0) after 10 steps
    picks = _run(QuotaCarry(), QUOTAS, 1, BIG, 10)
    assert [b.index(1) for b in picks] == [0, 1, 2, 0, 0, 1, 0, 2, 1, 0]


@pytest.mark.parametrize("rounding", ["smallest_first", "largest_remainder"])
def test_per_step_roundings_never_pick_the_domains_that_sort_last(rounding):
    # the bias "carry" removes: every quota floors to 0 and the one unit goes to domain 0 every step
    # (smallest_first: lowest id; largest_remainder: largest fraction), so domains 1 and 2 are never trained
    totals = sum(round_quotas(QUOTAS, 1, BIG, rounding) for _ in range(100))
    assert totals.tolist() == [100, 0, 0]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 4),
    weights=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=3).filter(lambda w: sum(w) > 1e-3),
)
def test_constant_quotas_stay_within_one_pick_for_up_to_three_domains(k, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    quota = k * w / w.sum()
    carry, counts = QuotaCarry(), torch.zeros(len(weights), dtype=torch.float64)
    for t in range(1, 201):
        counts += round_quotas(quota, k, torch.full((len(weights),), 50), "carry", carry)
        assert ((counts - t * quota).abs() < 1).all()


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    domains=st.integers(1, 6),
    steps=st.integers(1, 30),
)
def test_budgets_sum_to_k_and_respect_the_caps_under_random_pools(data, domains, steps):
    carry = QuotaCarry()
    for _ in range(steps):
        caps = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=domains, max_size=domains)))
        if int(caps.sum()) == 0:
            continue
        k = data.draw(st.integers(1, int(caps.sum())))
        weights = torch.tensor(data.draw(st.lists(st.floats(0.0, 10.0), min_size=domains, max_size=domains)))
        if float(weights.sum()) <= 0:
            weights = torch.ones(domains)
        # weights ignore the caps, so quotas may exceed n_d: the excess must flow to the others
        budgets = budgets_from_weights(caps, k, weights, rounding="carry", carry=carry)
        assert int(budgets.sum()) == k
        assert bool((budgets >= 0).all()) and bool((budgets <= caps).all())
        assert bool((carry.values.abs() <= 1).all())
        # proportional quotas never exceed the caps
        budgets = proportional_budgets(caps, k, rounding="carry", carry=carry)
        assert int(budgets.sum()) == k and bool((budgets <= caps).all()) and bool((budgets >= 0).all())


def test_a_domain_the_pool_cannot_serve_banks_at_most_one_pick():
    carry = QuotaCarry()
    # domain 0 has no candidates for 10 steps: its units flow to the others, its credit stops at 1
    for _ in range(10):
        assert round_quotas(QUOTAS, 1, torch.tensor([0, 5, 5]), "carry", carry)[0] == 0
    assert carry.values[0] == 1.0 and bool((carry.values >= -1).all())
    # back in the pool: one catch-up pick, not ten
    assert _run(carry, QUOTAS, 1, BIG, 1) == [[1, 0, 0]]
    assert carry.values[0] == 0.5


def _continue(carry: QuotaCarry, steps: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        counts = torch.randint(0, 6, (4,), generator=gen) + torch.tensor([1, 0, 0, 0])
        out.append(proportional_budgets(counts, 2, rounding="carry", carry=carry).tolist())
    return out


def test_state_dict_round_trip_continues_bit_identically():
    a = QuotaCarry()
    _continue(a, 7, seed=0)
    state = a.state_dict()
    assert isinstance(state["carry"], list) and all(isinstance(v, float) for v in state["carry"])
    via_json = QuotaCarry()
    via_json.load_state_dict(json.loads(json.dumps(state)))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    via_torch = QuotaCarry()
    via_torch.load_state_dict(torch.load(buf, weights_only=True))
    expected = _continue(a, 40, seed=1)
    for b in (via_json, via_torch):
        assert _continue(b, 40, seed=1) == expected
        assert torch.equal(b.values, a.values)
    assert QuotaCarry().state_dict() == {"carry": []}


def test_carry_errors():
    with pytest.raises(ValueError, match="carry=QuotaCarry"):
        round_quotas(QUOTAS, 1, BIG, "carry")
    carry = QuotaCarry([0.1, -0.1])
    with pytest.raises(ValueError, match="one mixture"):
        carry.round(QUOTAS, 1, BIG)
    with pytest.raises(ValueError, match="only hold"):
        QuotaCarry().round(QUOTAS, 3, torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="finite"):
        QuotaCarry([float("nan")])
    assert "carry" in ROUNDINGS


def test_default_rounding_holds_no_state():
    assert BudgetPolicy().carry is None and BudgetPolicy().state_dict() == {}
    assert get_selector("stratified").state_dict() == {}
    assert BudgetPolicy(rounding="carry") == BudgetPolicy(rounding="carry")  # the carry is not a field
    assert BudgetPolicy(rounding="carry").carry is not BudgetPolicy(rounding="carry").carry


def test_carry_is_not_warned_about_and_the_warning_names_it(caplog, monkeypatch):
    import mixsel.selection.budgets as budgets

    monkeypatch.setattr(budgets, "_WARNED_SMALL_K", set())
    with caplog.at_level(logging.WARNING, logger="mixsel.selection.budgets"):
        round_quotas(QUOTAS, 1, BIG, "carry", QuotaCarry())
        assert not caplog.records
        round_quotas(QUOTAS, 1, BIG)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "never trained" in message and "rounding: carry" in message and "\n" not in message


# --- selectors -------------------------------------------------------------------------------------


def _strat_pool(step):
    # 5 / 3 / 2 candidates of domains 0 / 1 / 2: proportional quotas of one pick [0.5, 0.3, 0.2]
    return Pool(domains=torch.tensor([0] * 5 + [1] * 3 + [2] * 2), num_domains=3, step=step)


def _picks(selector, pool_of, steps, k=1, start=0):
    out = []
    for t in range(start, start + steps):
        pool = pool_of(t)
        sel = selector.select(pool, k)
        out.append(torch.bincount(pool.domains[sel.indices], minlength=pool.num_domains).tolist())
    return out


def test_stratified_with_carry_gives_every_domain_its_share_over_the_steps():
    default = torch.tensor(_picks(get_selector("stratified"), _strat_pool, 20)).sum(0)
    assert default.tolist() == [20, 0, 0]  # the official rounding: domains 1 and 2 never picked
    carried = torch.tensor(_picks(get_selector("stratified", rounding="carry"), _strat_pool, 20)).sum(0)
    assert carried.tolist() == [10, 6, 4]


def test_stratified_carry_resumes_bit_identically_through_json():
    whole = get_selector("stratified", rounding="carry")
    expected = [whole.select(_strat_pool(t), 1).indices.tolist() for t in range(12)]
    first = get_selector("stratified", rounding="carry")
    got = [first.select(_strat_pool(t), 1).indices.tolist() for t in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state) == {CARRY_KEY}
    resumed = get_selector("stratified", rounding="carry")
    resumed.load_state_dict(state)
    got += [resumed.select(_strat_pool(t), 1).indices.tolist() for t in range(5, 12)]
    assert got == expected
    assert whole.state_dict() == resumed.state_dict()


def test_missing_carry_in_a_resumed_state_starts_from_zero_with_a_warning(caplog):
    sel = get_selector("stratified", rounding="carry")
    sel.select(_strat_pool(0), 1)
    with caplog.at_level(logging.WARNING, logger="mixsel.selection.budgets"):
        sel.load_state_dict({})
    assert sel.budgets.carry.values is None and "budget_carry" in caplog.text


def _ps_pool(step):
    gen = torch.Generator().manual_seed(step)
    dom = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    g = torch.randn(dom.numel(), 4, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    return Pool(domains=dom, num_domains=3, features={"gram": g @ g.T, "val_scores": g @ v.T}, lr=1e-3, step=step)


def test_partitionsel_with_carry_trains_every_domain_and_saves_its_carry():
    assert torch.tensor(_picks(get_selector("partitionsel"), _ps_pool, 10)).sum(0).tolist() == [10, 0, 0]
    sel = get_selector("partitionsel", rounding="carry")
    assert torch.tensor(_picks(sel, _ps_pool, 10)).sum(0).tolist() == [5, 3, 2]
    resumed = get_selector("partitionsel", rounding="carry")
    resumed.load_state_dict(sel.state_dict())
    assert _picks(resumed, _ps_pool, 6, start=10) == _picks(sel, _ps_pool, 6, start=10)


def test_colm_with_carry_saves_its_carry_beside_the_adam_moments():
    def pool(step):
        gen = torch.Generator().manual_seed(step)
        dom = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
        return Pool(domains=dom, num_domains=3, features={"grads": torch.randn(10, 4, generator=gen)}, step=step)

    sel = get_selector("colm", feature="grads", keep_small=False, rounding="carry")
    assert torch.tensor(_picks(sel, pool, 10)).sum(0).tolist() == [5, 3, 2]
    state = sel.state_dict()
    assert set(state) == {"normalizer", CARRY_KEY}
    resumed = get_selector("colm", feature="grads", keep_small=False, rounding="carry")
    resumed.load_state_dict(state)
    assert _picks(resumed, pool, 4, start=10) == _picks(sel, pool, 4, start=10)
    assert CARRY_KEY not in get_selector("colm", feature="grads").state_dict()


@pytest.mark.parametrize(
    "name,opts",
    [
        ("middle_ppl", {"per_domain_budgets": True}),
        ("big_loss", {"per_domain_budgets": True}),
    ],
)
def test_ranked_selectors_pass_the_rounding_through(name, opts):
    def pool(step):
        gen = torch.Generator().manual_seed(step)
        dom = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
        feats = {"perplexity": torch.rand(10, generator=gen) + 1, "loss": torch.rand(10, generator=gen)}
        return Pool(domains=dom, num_domains=3, features=feats, step=step)

    sel = get_selector(name, rounding="carry", **opts)
    assert torch.tensor(_picks(sel, pool, 10)).sum(0).tolist() == [5, 3, 2]
    assert set(sel.state_dict()) == {CARRY_KEY}
