"""DoReMi (Xie et al., 2023, arXiv 2305.10429, Algorithm 1) against hand-computed updates on 3 domains.

The first tests feed per-example statistics (``clip="domain"``: the domain's mean excess, clipped);
the defaults (per-token clipping, absent domains keep their score, running average with the
initial weights) are checked after them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsel import DomainStats, get_reweighter
from mixsel.bookkeeping import domain_stats
from mixsel.reweighting.doremi import excess_loss

DOMAINS = ["web", "code", "math"]
EPS = 1e-3


def _stats(counts, loss, ref) -> DomainStats:
    return DomainStats(
        counts=torch.tensor(counts),
        loss_sum=torch.tensor(loss, dtype=torch.float64),
        ref_loss_sum=torch.tensor(ref, dtype=torch.float64),
    )


# Step 1: mean excess = (4-2)/2 = 1, (1-2)/1 = -1 -> clipped 0, math absent -> 0.
S1 = ([2, 1, 0], [4.0, 1.0, 0.0], [2.0, 2.0, 0.0])
# Step 2: (1-1.5)/1 = -0.5 -> 0, (6-2)/2 = 2, (3-1.5)/3 = 0.5.
S2 = ([1, 2, 3], [1.0, 6.0, 3.0], [1.5, 2.0, 1.5])


def _normalise_smooth(v: list[float]) -> list[float]:
    total = sum(v)
    return [(1 - EPS) * x / total + EPS / 3 for x in v]


def _expected_two_steps() -> tuple[list[float], list[float]]:
    e = math.e
    a1 = _normalise_smooth([e / 3, 1 / 3, 1 / 3])  # uniform * exp([1, 0, 0])
    a2 = _normalise_smooth([a1[0] * 1.0, a1[1] * math.exp(2.0), a1[2] * math.exp(0.5)])
    return a1, a2


def test_two_updates_match_hand_computation():
    r = get_reweighter("doremi", domains=DOMAINS, clip="domain", average="updates")
    assert r.mode == "loss"
    a1, a2 = _expected_two_steps()
    w1 = r.update(_stats(*S1))
    assert w1.tolist() == pytest.approx(a1, rel=1e-12)
    assert r.excess.tolist() == [1.0, 0.0, 0.0]
    w2 = r.update(_stats(*S2))
    assert w2.tolist() == pytest.approx(a2, rel=1e-12)
    assert r.excess.tolist() == [0.0, 2.0, 0.5]
    assert r.average_weights.tolist() == pytest.approx([(x + y) / 2 for x, y in zip(a1, a2)], rel=1e-12)
    log = r.log_dict()
    assert log["weights/code"] == pytest.approx(a2[1], rel=1e-12)
    assert log["excess/math"] == 0.5
    assert log["avg_weights/web"] == pytest.approx((a1[0] + a2[0]) / 2, rel=1e-12)


def test_step_size_initial_weights_and_no_smoothing():
    r = get_reweighter(
        "doremi",
        domains=DOMAINS,
        step_size=0.5,
        smoothing=0.0,
        initial_weights={"web": 2, "code": 1, "math": 1},
        clip="domain",
    )
    assert r.average_weights.tolist() == [0.5, 0.25, 0.25]  # alpha_0 before any update
    w = r.update(_stats(*S1))
    v = [0.5 * math.exp(0.5), 0.25, 0.25]
    assert w.tolist() == pytest.approx([x / sum(v) for x in v], rel=1e-12)


def test_absent_domain_zero_vs_previous():
    step2 = ([0, 1, 1], [0.0, 3.0, 1.0], [0.0, 1.0, 1.0])  # web absent; code excess 2, math 0
    zero = get_reweighter("doremi", domains=DOMAINS, smoothing=0.0, clip="domain", absent="zero")
    prev = get_reweighter("doremi", domains=DOMAINS, smoothing=0.0, clip="domain")  # the default: "previous"
    for r in (zero, prev):
        r.update(_stats(*S1))
        r.update(_stats(*step2))
    assert zero.excess.tolist() == [0.0, 2.0, 0.0]
    assert prev.excess.tolist() == [1.0, 2.0, 0.0]
    e = math.e
    # both start from [e, 1, 1]/(e+2); 'previous' multiplies web by e again.
    exp_zero = [e, math.exp(2.0), 1.0]
    exp_prev = [e * e, math.exp(2.0), 1.0]
    assert zero.weights.tolist() == pytest.approx([x / sum(exp_zero) for x in exp_zero], rel=1e-12)
    assert prev.weights.tolist() == pytest.approx([x / sum(exp_prev) for x in exp_prev], rel=1e-12)


def test_update_every_accumulates_the_window():
    r = get_reweighter("doremi", domains=DOMAINS, update_every=2, clip="domain")
    assert r.update(_stats(*S1)).tolist() == [1 / 3] * 3  # no update yet
    w = r.update(_stats(*S2))
    # summed window: counts 3,3,3; loss 5,7,3; ref 3.5,4,1.5 -> excess 0.5, 1, 0.5
    expected = _normalise_smooth([math.exp(0.5), math.exp(1.0), math.exp(0.5)])
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert (r.num_calls, r.num_updates) == (2, 1)


def test_excess_loss_clips_the_mean():
    lam, present = excess_loss(_stats(*S2), clip="domain")
    assert lam.tolist() == [0.0, 2.0, 0.5]
    assert present.tolist() == [True, True, True]


def test_nan_and_missing_reference_raise_clear_errors():
    r = get_reweighter("doremi", domains=DOMAINS, clip="domain")
    with pytest.raises(ValueError, match=r"loss_sum is NaN or infinite for domain\(s\) \['code'\].*learning rate"):
        r.update(_stats([1, 1, 1], [1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"ref_loss_sum .*\['math'\]"):
        r.update(_stats([1, 1, 1], [1.0, 1.0, 1.0], [1.0, 1.0, float("inf")]))
    with pytest.raises(ValueError, match="needs DomainStats.ref_loss_sum"):
        r.update(DomainStats(counts=torch.tensor([1, 1, 1]), loss_sum=torch.ones(3)))
    with pytest.raises(ValueError, match="token_counts and excess_sum"):
        get_reweighter("doremi", domains=DOMAINS).update(_stats(*S1))
    assert r.num_updates == 0 and r.weights.tolist() == [1 / 3] * 3


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"step_size": -1.0}, "step_size"),
        ({"smoothing": 2.0}, "smoothing"),
        ({"absent": "keep"}, "absent"),
        ({"clip": "example"}, "clip"),
        ({"average": "last"}, "average"),
        ({"initial_excess": -1.0}, "initial_excess"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        get_reweighter("doremi", domains=DOMAINS, **config)


_loss = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e300), st.floats(min_value=-1e300, max_value=0))
_step = st.tuples(
    st.lists(st.integers(0, 4), min_size=3, max_size=3),
    st.lists(_loss, min_size=3, max_size=3),
    st.lists(_loss, min_size=3, max_size=3),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(_step, min_size=1, max_size=5),
    step_size=st.floats(min_value=0.0, max_value=1e6),
    smoothing=st.sampled_from([0.0, 1e-3, 0.5]),
)
def test_weights_stay_on_simplex_for_extreme_inputs(steps, step_size, smoothing):
    r = get_reweighter("doremi", domains=DOMAINS, step_size=step_size, smoothing=smoothing, clip="domain")
    for counts, loss, ref in steps:
        w = r.update(_stats(counts, loss, ref))
        assert bool(torch.isfinite(w).all())
        assert bool((w >= 0).all())
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
        assert float(w.min()) >= smoothing / 3 * (1 - 1e-12)
    avg = r.average_weights
    assert bool(torch.isfinite(avg).all()) and math.isclose(float(avg.sum()), 1.0, rel_tol=1e-12)


def _token_window() -> DomainStats:
    """Per-token stats of 3 examples through mixsel.bookkeeping.domain_stats (web: A, B; code: C).

    A: proxy [3, 1], ref [1, 2] -> clipped excess [2, 0]; B: one target token, proxy 1, ref 2 -> 0;
    C: proxy [2, 2], ref [1, 1] -> [1, 1]. math is absent.
    """
    proxy = torch.tensor([[3.0, 1.0], [1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    ref = torch.tensor([[1.0, 2.0], [2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    return domain_stats(torch.tensor([0, 0, 1]), proxy, 3, step=0, ref_losses=ref, mask=mask)


def test_per_token_clipping_then_average_over_the_domains_tokens():
    stats = _token_window()
    assert stats.token_counts.tolist() == [3.0, 2.0, 0.0]
    assert stats.excess_sum.tolist() == [2.0, 2.0, 0.0]
    # per-example means: A 2 vs 1.5, B 1 vs 2, C 2 vs 1
    assert stats.loss_sum.tolist() == [3.0, 2.0, 0.0] and stats.ref_loss_sum.tolist() == [3.5, 1.0, 0.0]
    lam, present = excess_loss(stats)  # web: 2 / 3 tokens; code: 2 / 2
    assert lam.tolist() == pytest.approx([2 / 3, 1.0, 0.0], rel=1e-12)
    assert present.tolist() == [True, True, False]
    # clipping the domain mean instead: web (3 - 3.5) / 2 < 0 -> 0
    assert excess_loss(stats, clip="domain")[0].tolist() == [0.0, 1.0, 0.0]
    w = get_reweighter("doremi", domains=DOMAINS).update(stats)
    assert w.tolist() == pytest.approx(_normalise_smooth([math.exp(2 / 3), math.e, 1.0]), rel=1e-12)


def test_absent_domain_keeps_its_previous_score_by_default():
    r = get_reweighter("doremi", domains=DOMAINS, smoothing=0.0)
    r.update(_token_window())  # math absent: keeps its initial score 0
    assert r.excess.tolist() == pytest.approx([2 / 3, 1.0, 0.0], rel=1e-12)
    only_math = domain_stats(
        torch.tensor([2]),
        torch.tensor([[3.0]], dtype=torch.float64),
        3,
        step=1,
        ref_losses=torch.tensor([[1.0]], dtype=torch.float64),
        mask=torch.tensor([[True]]),
    )
    w1 = r.weights
    w2 = r.update(only_math)  # web and code keep 2/3 and 1; math gets 2
    assert r.excess.tolist() == pytest.approx([2 / 3, 1.0, 2.0], rel=1e-12)
    v = [float(w1[0]) * math.exp(2 / 3), float(w1[1]) * math.e, float(w1[2]) * math.exp(2.0)]
    assert w2.tolist() == pytest.approx([x / sum(v) for x in v], rel=1e-12)
    # the reference code's initial score (log |vocabulary|) for a domain not seen yet
    logv = get_reweighter("doremi", domains=DOMAINS, initial_excess=math.log(97))
    logv.update(_token_window())
    assert logv.excess.tolist()[2] == pytest.approx(math.log(97), rel=1e-12)


def test_running_average_with_and_without_the_initial_weights():
    a1, a2 = _expected_two_steps()
    code = get_reweighter("doremi", domains=DOMAINS, clip="domain")  # average="with_initial"
    paper = get_reweighter("doremi", domains=DOMAINS, clip="domain", average="updates")
    for r in (code, paper):
        r.update(_stats(*S1))
        r.update(_stats(*S2))
    third = 1 / 3
    assert code.average_weights.tolist() == pytest.approx([(third + x + y) / 3 for x, y in zip(a1, a2)], rel=1e-12)
    assert paper.average_weights.tolist() == pytest.approx([(x + y) / 2 for x, y in zip(a1, a2)], rel=1e-12)


def test_proposal_is_uniform_by_default_and_natural_on_request():
    rw = get_reweighter("doremi", domains=["a", "b", "c", "d"])
    assert torch.equal(rw.proposal_weights, torch.full((4,), 0.25, dtype=torch.float64))
    assert get_reweighter("doremi", domains=["a", "b"], proposal="natural").proposal_weights is None
    with pytest.raises(ValueError, match="proposal"):
        get_reweighter("doremi", domains=["a", "b"], proposal="zipf")


def test_train_draws_doremi_pools_from_the_proposal(tmp_path, monkeypatch):
    """Loss-mode DoReMi: the pools come from the uniform proposal, not the natural mixture."""
    pytest.importorskip("transformers")
    from mixsel.config import load_config
    from mixsel.data.sampler import CandidateSampler
    from mixsel.train import train

    from _fast import FAST

    drawn = []
    real_draw = CandidateSampler.draw

    def draw(self, weights=None):
        drawn.append(None if weights is None else weights.clone())
        return real_draw(self, weights)

    monkeypatch.setattr(CandidateSampler, "draw", draw)
    ref = tmp_path / "ref"
    train(
        load_config(None, [*FAST, f"train.output_dir={ref}", "train.max_steps=1", "eval.exact_match=0"]), progress=False
    )
    drawn.clear()
    cfg = [*FAST, f"train.output_dir={tmp_path / 'p'}", "train.max_steps=2", "eval.exact_match=0"]
    train(
        load_config(None, [*cfg, "reweighting.method=doremi", f"reweighting.reference_model={ref}/final"]),
        progress=False,
    )
    assert len(drawn) == 2 and all(torch.allclose(w, torch.full((7,), 1 / 7, dtype=w.dtype)) for w in drawn)
    drawn.clear()
    natural = "reweighting.options={proposal: natural}"
    train(
        load_config(None, [*cfg, "reweighting.method=doremi", f"reweighting.reference_model={ref}/final", natural]),
        progress=False,
    )
    assert drawn == [None, None]
