"""The step bookkeeping both loops share: hand-computed weights, statistics, anchors and schedules."""

from __future__ import annotations

import pytest
import torch

from mixsel import bookkeeping, get_reweighter
from mixsel.types import Selection

DOMAINS = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("name", "options", "sampling", "loss"),
    [
        ("static", {"weights": [1, 1, 2], "mode": "sampling"}, [0.25, 0.25, 0.5], None),
        ("static", {"weights": [1, 1, 2], "mode": "loss"}, None, [0.75, 0.75, 1.5]),
        ("static", {"weights": [1, 1, 2], "mode": "both"}, [0.25, 0.25, 0.5], [0.75, 0.75, 1.5]),
        ("doremi", {}, [1 / 3] * 3, [1.0, 1.0, 1.0]),  # loss mode; pools from the uniform proposal
        ("doremi", {"proposal": "natural"}, None, [1.0, 1.0, 1.0]),
    ],
)
def test_mixture_weights_by_mode(name, options, sampling, loss):
    s, m = bookkeeping.mixture_weights(get_reweighter(name, domains=DOMAINS, **options))
    assert (s is None) == (sampling is None) and (m is None) == (loss is None)
    if s is not None:
        assert s.tolist() == pytest.approx(sampling)
    if m is not None:
        assert m.tolist() == pytest.approx(loss)


def test_example_weights_compose_selection_and_domain_weights():
    sel = Selection(indices=torch.tensor([4, 1, 2]), weights=torch.tensor([2.0, 1.0, 3.0]))
    domains = torch.tensor([0, 2, 2])
    loss_w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    w = bookkeeping.example_weights(sel, domains, use_weights=True, loss_weights=loss_w)
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 1.5, 4.5]
    assert bookkeeping.example_weights(sel, domains, use_weights=False, loss_weights=loss_w).tolist() == [
        0.5,
        1.5,
        1.5,
    ]
    assert bookkeeping.example_weights(sel, domains, use_weights=False, loss_weights=None).tolist() == [1.0] * 3


def test_warn_unused_weights(caplog):
    varied = Selection(indices=torch.tensor([0, 1]), weights=torch.tensor([1.0, 3.0]))
    with caplog.at_level("WARNING"):
        bookkeeping.warn_unused_weights(varied, use_weights=True, method="craig")
        assert not caplog.records
        bookkeeping.warn_unused_weights(Selection.uniform(torch.tensor([0, 1])), use_weights=False, method="random")
        assert not caplog.records
        bookkeeping.warn_unused_weights(varied, use_weights=False, method="craig")
    assert "selection.use_weights=true" in caplog.text


def test_domain_stats_hand_values():
    stats = bookkeeping.domain_stats(
        torch.tensor([2, 0, 2, 2]),
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        3,
        step=7,
        ref_losses=torch.tensor([0.5, 0.5, 0.5, 0.5]),
    )
    assert stats.counts.tolist() == [1.0, 0.0, 3.0]
    assert stats.loss_sum.tolist() == [2.0, 0.0, 8.0]
    assert stats.ref_loss_sum.tolist() == [0.5, 0.0, 1.5]
    assert stats.step == 7 and stats.grad is None
    assert stats.loss_sum.dtype == torch.float64


def test_reduce_stats_sums_additive_fields_only():
    stats = bookkeeping.domain_stats(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), 2, step=0)
    stats.grad = torch.ones(2, 3, dtype=torch.float64)
    stats.val_grad = torch.ones(3, dtype=torch.float64)
    bookkeeping.reduce_stats(stats, lambda t: t * 2)  # two identical ranks
    assert stats.counts.tolist() == [2.0, 2.0] and stats.loss_sum.tolist() == [2.0, 4.0]
    assert stats.grad.sum().item() == 12 and stats.val_grad.tolist() == [1.0, 1.0, 1.0]
    assert stats.ref_loss_sum is None


def test_draw_anchors_is_seeded_per_step_and_capped():
    a = bookkeeping.draw_anchors(50, 4, seed=3, step=10)
    assert torch.equal(a, bookkeeping.draw_anchors(50, 4, seed=3, step=10))
    assert not torch.equal(a, bookkeeping.draw_anchors(50, 4, seed=3, step=11))
    assert len(a.unique()) == 4 and int(a.max()) < 50
    assert len(bookkeeping.draw_anchors(3, 8, seed=0, step=0)) == 3


def test_balanced_rows_and_update_steps():
    ids = torch.tensor([1, 0, 1, 1, 2, 0])
    assert bookkeeping.balanced_rows(ids, 3, 2).tolist() == [1, 5, 0, 2, 4]
    assert [s for s in range(10) if bookkeeping.is_update_step(s, 4)] == [0, 3, 7]
    assert all(bookkeeping.is_update_step(s, 1) for s in range(5))
