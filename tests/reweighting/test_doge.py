"""DoGE (arXiv 2310.15393): hand-computed updates on 3 domains, absent domains, the target mode, the simplex
under extreme inputs, the running average and a state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from mixsel import DomainStats, get_reweighter
from mixsel.reweighting.doge import doge_scores

DOMAINS = ["web", "code", "math"]
G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def stats(grad_sum, counts, val=None, step=0):
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return DomainStats(
        counts=counts,
        loss_sum=counts.clone(),
        grad=torch.as_tensor(grad_sum, dtype=torch.float64),
        val_grad=val,
        step=step,
    )


def _softmax_step(prev, gains):
    logits = [math.log(p) + g for p, g in zip(prev, gains)]
    z = sum(math.exp(x) for x in logits)
    return [math.exp(x) / z for x in logits]


def test_hand_computed_update_on_three_domains():
    # W = G Gᵀ = [[1,0,1],[0,1,1],[1,1,2]]; s = row sums - diagonal = [1, 1, 2];
    # mean norm = (1 + 1 + √2) / 3; η = 0.5
    rw = get_reweighter("doge", domains=DOMAINS, step_size=0.5)
    assert rw.needs_grad and rw.mode == "loss"
    counts = [2, 1, 4]
    w = rw.update(stats(G * torch.tensor(counts, dtype=torch.float64).unsqueeze(-1), counts))  # sums -> means = G
    mean_norm = (2 + math.sqrt(2)) / 3
    scores = [1 / (mean_norm + 1e-6), 1 / (mean_norm + 1e-6), 2 / (mean_norm + 1e-6)]
    assert rw.scores.tolist() == pytest.approx(scores, rel=1e-9)
    expected = _softmax_step([1 / 3] * 3, [0.5 * s for s in scores])
    assert w.tolist() == pytest.approx(expected, rel=1e-9)
    assert rw.average_weights.tolist() == pytest.approx(expected, rel=1e-9)
    log = rw.log_dict()
    assert log["weights/math"] == pytest.approx(expected[2]) and log["score/web"] == pytest.approx(scores[0])

    # second update: "math" absent keeps its last gradient; "web" turns against "code" -> clipped at 0
    grads = torch.tensor([[-1.0, -2.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    w2 = rw.update(stats(grads, [1, 1, 0], step=1))
    g = torch.tensor([[-1.0, -2.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    gram = g @ g.T
    raw = (gram.sum(1) - torch.diagonal(gram)).tolist()  # [-5, 0, -2]
    norm = float(g.norm(dim=1).mean())
    clipped = [min(max(r / (norm + 1e-6), 0.0), 5.0) for r in raw]
    assert clipped == [0.0, 0.0, 0.0]
    assert w2.tolist() == pytest.approx(expected, rel=1e-9)  # all scores clipped to 0: the weights stay
    avg = [(a + b) / 2 for a, b in zip(expected, expected)]
    assert rw.average_weights.tolist() == pytest.approx(avg)


def test_validation_target_and_smoothing():
    v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    rw = get_reweighter("doge", domains=DOMAINS, step_size=1.0, target="validation", smoothing=0.1)
    w = rw.update(stats(G, [1, 1, 1], val=v))
    mean_norm = (2 + math.sqrt(2)) / 3
    # <g_d, v> = [1, -1, 0] -> clip(·/mean_norm, 0, 5) = [1/mean_norm, 0, 0]
    scores = [1 / (mean_norm + 1e-6), 0.0, 0.0]
    assert rw.scores.tolist() == pytest.approx(scores, rel=1e-9)
    stepped = _softmax_step([1 / 3] * 3, scores)
    assert w.tolist() == pytest.approx([0.9 * p + 0.1 / 3 for p in stepped], rel=1e-9)
    with pytest.raises(ValueError, match="val_grad"):
        get_reweighter("doge", domains=DOMAINS, target="validation").update(stats(G, [1, 1, 1]))


def test_clip_range_and_scale_invariance():
    scores = doge_scores(G, clip_min=-10.0, clip_max=10.0)
    # raw / mean-norm is linear in the gradient scale; clipping bounds every score
    big = doge_scores(G * 1e150, clip_min=-10.0, clip_max=10.0)
    assert big.tolist() == [10.0, 10.0, 10.0]
    small = doge_scores(G * 1e-3, clip_min=-10.0, clip_max=10.0)
    assert small.tolist() == pytest.approx((scores * 1e-3).tolist(), rel=1e-3)


def test_simplex_under_extreme_inputs_and_options():
    rw = get_reweighter("doge", domains=DOMAINS, step_size=1e6, clip_max=1e6)
    for step in range(3):
        w = rw.update(stats(torch.randn(3, 4, dtype=torch.float64) * 1e200, [1, 0, 3], step=step))
        assert torch.isfinite(w).all() and abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
    for bad in ({"step_size": -1}, {"target": "ood"}, {"clip_min": 2, "clip_max": 1}, {"smoothing": 2}):
        with pytest.raises(ValueError, match="doge"):
            get_reweighter("doge", domains=DOMAINS, **bad)
    with pytest.raises(ValueError, match="DomainStats.grad"):
        get_reweighter("doge", domains=DOMAINS).update(DomainStats(counts=torch.ones(3), loss_sum=torch.ones(3)))


def test_state_round_trip_continues_identically():
    g = torch.Generator().manual_seed(0)
    stream = [
        stats(torch.randn(3, 5, generator=g, dtype=torch.float64), [1, step % 2, 2], torch.randn(5, generator=g), step)
        for step in range(6)
    ]
    a = get_reweighter("doge", domains=DOMAINS, step_size=0.3, update_every=2)
    for s in stream[:3]:
        a.update(s)
    b = get_reweighter("doge", domains=DOMAINS, step_size=0.3, update_every=2)
    b.load_state_dict(a.state_dict())
    for s in stream[3:]:
        assert torch.equal(a.update(s), b.update(s))
    assert torch.equal(a.average_weights, b.average_weights)
