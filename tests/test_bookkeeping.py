"""The step bookkeeping both loops share: hand-computed weights, statistics, anchors and schedules."""

from __future__ import annotations

import pytest
import torch

from mixsel import bookkeeping, get_reweighter, get_selector
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


def test_one_weights_switch_defaults_to_the_method_and_warns_against_it(caplog):
    craig, colm, rand = get_selector("craig"), get_selector("colm"), get_selector("random")
    with caplog.at_level("WARNING"):
        assert bookkeeping.resolve_use_weights(craig, None) is True  # CRAIG trains on cluster sizes
        assert bookkeeping.resolve_use_weights(get_selector("gradmatch"), None) is True
        assert bookkeeping.resolve_use_weights(colm, None) is False  # CoLM: uniform weights
        assert bookkeeping.resolve_use_weights(get_selector("partitionsel"), None) is False
        assert bookkeeping.resolve_use_weights(rand, True) is True  # ones either way: nothing to say
        assert bookkeeping.resolve_use_weights(craig, True) is True
        assert not caplog.records
        assert bookkeeping.resolve_use_weights(craig, False) is False
    assert "'craig' trains on its selection weights" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert bookkeeping.resolve_use_weights(colm, True) is True
    assert "'colm' trains unweighted" in caplog.text


def test_source_sizes_count_the_dataset():
    assert bookkeeping.source_sizes(torch.tensor([2, 0, 2, 2]), 4).tolist() == [1, 0, 3, 0]


def test_per_token_domain_stats_hand_values():
    # rows: domain 1 with targets [2, 4] (ref [1, 5]); domain 0 with one target 3 (ref 1)
    losses = torch.tensor([[2.0, 4.0], [3.0, 9.0]])
    ref = torch.tensor([[1.0, 5.0], [1.0, 7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    stats = bookkeeping.domain_stats(torch.tensor([1, 0]), losses, 2, step=3, ref_losses=ref, mask=mask)
    assert stats.counts.tolist() == [1.0, 1.0]
    assert stats.loss_sum.tolist() == [3.0, 3.0]  # per-example means over the targets
    assert stats.ref_loss_sum.tolist() == [1.0, 3.0]
    assert stats.token_counts.tolist() == [1.0, 2.0]
    assert stats.excess_sum.tolist() == [2.0, 1.0]  # max(4 - 5, 0) + max(2 - 1, 0) = 1
    empty = bookkeeping.domain_stats(torch.zeros(0, dtype=torch.long), torch.zeros(0), 2, step=0, mask=mask[:0])
    assert empty.token_counts.tolist() == [0.0, 0.0] and empty.excess_sum is None
    with pytest.raises(ValueError, match="mask"):
        bookkeeping.domain_stats(torch.tensor([1, 0]), losses, 2, step=0)


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
    # uniform sampling only needs the count: the same rows from the domain ids
    ids = torch.arange(50) % 7
    assert torch.equal(a, bookkeeping.draw_anchors(ids, 4, seed=3, step=10))


def test_balanced_anchors_cover_the_domains_round_robin():
    ids = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    for step in range(5):
        rows = bookkeeping.draw_anchors(ids, 5, seed=1, step=step, sampling="balanced")
        counts = torch.bincount(ids[rows], minlength=3).tolist()
        # 5 over 3 domains: 2, 2, 1 in a seeded order, but domain 2 holds one row: it takes 1
        assert sorted(counts) == [1, 2, 2] and len(rows.unique()) == 5
    rows = bookkeeping.draw_anchors(ids, 12, seed=1, step=0, sampling="balanced")
    assert torch.bincount(ids[rows], minlength=3).tolist() == [8, 3, 1]  # the others fill up
    every = bookkeeping.draw_anchors(ids, 99, seed=1, step=0, sampling="balanced")
    assert sorted(every.tolist()) == list(range(14))
    with pytest.raises(ValueError, match="domain id"):
        bookkeeping.draw_anchors(14, 3, seed=0, step=0, sampling="balanced")
    with pytest.raises(ValueError, match="stratified"):
        bookkeeping.draw_anchors(ids, 3, seed=0, step=0, sampling="stratified")


def test_balanced_rows_and_update_steps():
    ids = torch.tensor([1, 0, 1, 1, 2, 0])
    assert bookkeeping.balanced_rows(ids, 3, 2).tolist() == [1, 5, 0, 2, 4]
    assert [s for s in range(10) if bookkeeping.is_update_step(s, 4)] == [0, 3, 7]
    assert all(bookkeeping.is_update_step(s, 1) for s in range(5))
