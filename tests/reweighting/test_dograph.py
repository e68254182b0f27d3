"""DoGraph (our reading of Xu et al., arXiv 2604.07963): graph, alignment, mirror descent, updates."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsel import DomainStats, get_reweighter
from mixsel.reweighting.dograph import (
    alignment_scores,
    cosine_similarity,
    dograph_objective,
    domain_graph,
    graph_laplacian,
    mirror_descent,
)

DOMAINS = ["web", "code", "math"]
R2 = 1 / math.sqrt(2)
EPS = 1e-3


def _close(tensor: torch.Tensor, nested: list[list[float]]) -> bool:
    return torch.allclose(tensor, torch.tensor(nested, dtype=torch.float64), rtol=0, atol=1e-15)


def _stats(counts, grad, val, loss=None) -> DomainStats:
    return DomainStats(
        counts=torch.tensor(counts),
        loss_sum=torch.zeros(len(counts)) if loss is None else torch.tensor(loss),
        grad=torch.tensor(grad, dtype=torch.float64),
        val_grad=None if val is None else torch.tensor(val, dtype=torch.float64),
    )


# Domain means: [1, 0], [1, 1], [0, 1]  (code's sum is [2, 2] over 2 examples).
BASE = ([1, 2, 1], [[1.0, 0.0], [2.0, 2.0], [0.0, 1.0]], [1.0, 0.0])


def test_graph_laplacian_and_alignment_hand_computed():
    means = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    sim = cosine_similarity(means)
    assert _close(sim, [[1, R2, 0], [R2, 1, R2], [0, R2, 1]])
    adj = domain_graph(sim)
    assert _close(adj, [[0, R2, 0], [R2, 0, R2], [0, R2, 0]])
    lap = graph_laplacian(adj)
    assert _close(lap, [[R2, -R2, 0], [-R2, 2 * R2, -R2], [0, -R2, R2]])
    valid = torch.ones(3, dtype=torch.bool)
    assert alignment_scores(means, torch.tensor([1.0, 0.0]), valid).tolist() == pytest.approx([1, R2, 0])
    # "dot": <g_d, v> / (|v| * mean |g_d|), mean norm = (1 + sqrt 2 + 1) / 3
    mean_norm = (2 + math.sqrt(2)) / 3
    dot = alignment_scores(means, torch.tensor([2.0, 0.0]), valid, "dot").tolist()
    assert dot == pytest.approx([1 / mean_norm, 1 / mean_norm, 0.0])
    invalid = torch.tensor([True, False, True])
    assert alignment_scores(means, torch.tensor([1.0, 0.0]), invalid).tolist() == pytest.approx([1, 0, 0])


def test_knn_and_threshold_graphs():
    sim = torch.tensor(
        [[1.0, 0.9, 0.5, 0.1], [0.9, 1.0, 0.2, 0.3], [0.5, 0.2, 1.0, 0.8], [0.1, 0.3, 0.8, 1.0]],
        dtype=torch.float64,
    )
    knn1 = domain_graph(sim, knn=1)  # 0<->1 and 2<->3 are mutual nearest neighbours
    assert knn1.tolist() == [[0, 0.9, 0, 0], [0.9, 0, 0, 0], [0, 0, 0, 0.8], [0, 0, 0.8, 0]]
    knn2 = domain_graph(sim, knn=2)  # union of each node's 2 best: every pair except 1-2 and 0-3
    assert knn2.tolist() == [[0, 0.9, 0.5, 0], [0.9, 0, 0, 0.3], [0.5, 0, 0, 0.8], [0, 0.3, 0.8, 0]]
    thr = domain_graph(sim, threshold=0.4)
    assert thr.tolist() == [[0, 0.9, 0.5, 0], [0.9, 0, 0, 0], [0.5, 0, 0, 0.8], [0, 0, 0.8, 0]]
    negative = domain_graph(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    assert negative.tolist() == [[0, 0], [0, 0]]  # anti-aligned domains are not connected


def test_objective_hand_computed():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    prev = torch.full((3,), 1 / 3, dtype=torch.float64)
    align = torch.tensor([1.0, R2, 0.0], dtype=torch.float64)
    lap = torch.tensor([[R2, -R2, 0], [-R2, 2 * R2, -R2], [0, -R2, R2]], dtype=torch.float64)
    value = dograph_objective(w, align=align, laplacian=lap, prev=prev, step_size=1.0, laplacian_strength=2.0, kl=1.0)
    # -<a, w> + (2/2) * sum_edges A_ij (w_i - w_j)^2 + KL(w || uniform)
    expected = -(0.5 + 0.3 * R2) + R2 * (0.2**2 + 0.1**2)
    expected += 0.5 * math.log(1.5) + 0.3 * math.log(0.9) + 0.2 * math.log(0.6)
    assert value == pytest.approx(expected, rel=1e-12)


def test_first_update_without_laplacian_is_closed_form():
    # gamma = 0: the minimiser is w ∝ w_prev * exp(eta * a / tau); the default inner step 1/tau hits it at once.
    r = get_reweighter("dograph", domains=DOMAINS, laplacian_strength=0.0, kl=1.0, inner_iters=1)
    w = r.update(_stats(*BASE))
    v = [math.e, math.exp(R2), 1.0]
    assert w.tolist() == pytest.approx([(1 - EPS) * x / sum(v) + EPS / 3 for x in v], rel=1e-12)
    assert r.alignment_scores.tolist() == pytest.approx([1, R2, 0])
    assert _close(r.adjacency, [[0, R2, 0], [R2, 0, R2], [0, R2, 0]])
    log = r.log_dict()
    assert set(log) >= {"weights/web", "weights/code", "weights/math", "align/web", "dograph/objective"}


def test_mirror_descent_with_small_steps_converges_to_closed_form():
    align = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    prev = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    w, obj = mirror_descent(
        align=align,
        laplacian=torch.zeros(3, 3),
        prev=prev,
        step_size=1.0,
        laplacian_strength=0.0,
        kl=2.0,
        iters=400,
        lr=0.05,
    )
    v = [0.5 * math.exp(0.15), 0.3 * math.exp(-0.1), 0.2 * math.exp(0.45)]
    assert w.tolist() == pytest.approx([x / sum(v) for x in v], rel=1e-9)
    assert obj.numel() == 401


def test_ema_second_update_and_absent_domain_keeps_its_ema():
    r = get_reweighter("dograph", domains=DOMAINS, ema=0.5, laplacian_strength=0.0, inner_iters=1)
    r.update(_stats(*BASE))
    # web absent (keeps [1, 0]); code mean [0, 2] -> EMA 0.5*[1,1] + 0.5*[0,2] = [0.5, 1.5];
    # math mean [0, 3] -> EMA [0, 2]. val EMA 0.5*[1,0] + 0.5*[1,2] = [1, 1].
    r.update(_stats([0, 1, 1], [[0.0, 0.0], [0.0, 2.0], [0.0, 3.0]], [1.0, 2.0]))
    expected_align = [R2, (0.5 + 1.5) / (math.sqrt(2.5) * math.sqrt(2)), R2]
    assert r.alignment_scores.tolist() == pytest.approx(expected_align, rel=1e-12)


def test_val_grad_per_domain_rows_are_averaged_and_reused_when_missing():
    a = get_reweighter("dograph", domains=DOMAINS)
    b = get_reweighter("dograph", domains=DOMAINS)
    counts, grad, _ = BASE
    a.update(_stats(counts, grad, [[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))  # mean [1, 0]
    b.update(_stats(*BASE))
    assert torch.allclose(a.weights, b.weights, rtol=1e-14, atol=0)
    a.update(_stats(counts, grad, None))  # reuses the validation EMA
    assert a.num_updates == 2


def test_aligned_domain_weight_grows():
    r = get_reweighter("dograph", domains=DOMAINS, step_size=0.5)
    stats = _stats([4, 4, 4], [[4.0, 0.0], [0.0, 4.0], [-4.0, -1.0]], [1.0, 0.0])
    previous = [1 / 3]
    for _ in range(5):
        w = r.update(stats)
        assert float(w[0]) > previous[-1]
        assert float(w[0]) > float(w[1]) > float(w[2])
        previous.append(float(w[0]))


def test_strong_laplacian_pulls_connected_domains_together():
    # web and code have similar gradients (cos 0.92) but opposite alignment with v = [0, 1];
    # math is anti-aligned with both, so it is not connected to them.
    stats = _stats([1, 1, 1], [[1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]], [0.0, 1.0])
    gaps = {}
    for gamma in (0.0, 50.0):
        r = get_reweighter(
            "dograph", domains=DOMAINS, laplacian_strength=gamma, inner_iters=300, initial_weights=[0.6, 0.2, 0.2]
        )
        w = r.update(stats)
        gaps[gamma] = abs(float(w[0] - w[1]))
        assert float(r.adjacency[0, 1]) > 0.9 and float(r.adjacency[0, 2]) == 0.0
    assert gaps[0.0] > 0.3
    assert gaps[50.0] < 0.1 * gaps[0.0]


def test_mirror_descent_reaches_a_stationary_point_of_the_graph_problem():
    # Interior optimum on the simplex <=> every component of grad F is equal (KKT).
    align = torch.tensor([0.2, -0.2, 0.0, 0.5], dtype=torch.float64)
    adj = torch.tensor([[0, 0.9, 0, 0.1], [0.9, 0, 0.3, 0], [0, 0.3, 0, 0.6], [0.1, 0, 0.6, 0]], dtype=torch.float64)
    lap = graph_laplacian(adj)
    prev = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    gamma, tau = 5.0, 0.5
    w, obj = mirror_descent(
        align=align, laplacian=lap, prev=prev, step_size=1.0, laplacian_strength=gamma, kl=tau, iters=2000
    )
    grad = -align + gamma * (lap @ w) + tau * torch.log(w / prev)
    assert float(grad.max() - grad.min()) < 1e-9
    assert float(obj[-1]) < float(obj[0])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num=st.integers(2, 6),
    gamma=st.floats(min_value=0.0, max_value=100.0),
    tau=st.floats(min_value=0.01, max_value=10.0),
    eta=st.floats(min_value=0.0, max_value=10.0),
)
def test_mirror_descent_objective_never_increases(seed, num, gamma, tau, eta):
    g = torch.Generator().manual_seed(seed)
    align = torch.rand(num, generator=g, dtype=torch.float64) * 2 - 1
    upper = torch.rand(num, num, generator=g, dtype=torch.float64).triu(1)
    lap = graph_laplacian(upper + upper.T)
    prev = torch.rand(num, generator=g, dtype=torch.float64) + 0.01
    prev = prev / prev.sum()
    w, obj = mirror_descent(
        align=align, laplacian=lap, prev=prev, step_size=eta, laplacian_strength=gamma, kl=tau, iters=30
    )
    diffs = obj[1:] - obj[:-1]
    assert float(diffs.max()) <= 1e-12 * (1.0 + float(obj.abs().max()))
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)


_val = st.one_of(st.just(0.0), st.floats(min_value=-1e300, max_value=1e300))
_step = st.tuples(
    st.lists(st.integers(0, 3), min_size=3, max_size=3),
    st.lists(st.lists(_val, min_size=2, max_size=2), min_size=3, max_size=3),
    st.lists(_val, min_size=2, max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(_step, min_size=1, max_size=4),
    alignment=st.sampled_from(["cosine", "dot"]),
    eta=st.sampled_from([0.0, 1.0, 1e6]),
    knn=st.sampled_from([None, 1]),
)
def test_weights_stay_on_simplex_for_extreme_inputs(steps, alignment, eta, knn):
    r = get_reweighter("dograph", domains=DOMAINS, alignment=alignment, step_size=eta, knn=knn, update_every=1)
    for counts, grad, val in steps:
        w = r.update(_stats(counts, grad, val))
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
        assert float(w.min()) >= EPS / 3 * (1 - 1e-12)


def test_errors_name_the_problem():
    r = get_reweighter("dograph", domains=DOMAINS)
    with pytest.raises(ValueError, match=r"grad is NaN or infinite for domain\(s\) \['math'\]"):
        r.update(_stats([1, 1, 1], [[1.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]], [1.0, 0.0]))
    with pytest.raises(ValueError, match="val_grad has NaN"):
        r.update(_stats([1, 1, 1], [[1.0, 0.0]] * 3, [float("nan"), 0.0]))
    with pytest.raises(ValueError, match="needs DomainStats.val_grad"):
        r.update(_stats([1, 1, 1], [[1.0, 0.0]] * 3, None))
    with pytest.raises(ValueError, match="needs DomainStats.grad"):
        r.update(DomainStats(counts=torch.ones(3), loss_sum=torch.zeros(3), val_grad=torch.ones(2)))
    with pytest.raises(ValueError, match="same feature map"):
        r.update(_stats([1, 1, 1], [[1.0, 0.0]] * 3, [1.0, 0.0, 0.0]))
    r.update(_stats(*BASE))
    with pytest.raises(ValueError, match="feature dimension fixed"):
        r.update(_stats([1, 1, 1], [[1.0, 0.0, 1.0]] * 3, [1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"kl": 0.0}, "kl"),
        ({"ema": 1.0}, "ema"),
        ({"laplacian_strength": -1.0}, "laplacian_strength"),
        ({"knn": 0}, "knn"),
        ({"threshold": -0.1}, "threshold"),
        ({"alignment": "l2"}, "alignment"),
        ({"inner_iters": 0}, "inner_iters"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        get_reweighter("dograph", domains=DOMAINS, **config)
