"""The step engine's pieces on tiny tensors: Batch, micro-batches (with stand-in rows), the weighted loss,
what a reweighter is fed. The loops' agreement is tested end to end in tests/parity."""

from __future__ import annotations

import pytest
import torch

from mixsel.engine import Batch, Engine, OnlineReweighter, weighted_loss
from mixsel.registry import get_reweighter


def _batch(n: int = 5, t: int = 6) -> Batch:
    ids = torch.arange(n * t).reshape(n, t) % 13 + 1
    labels = ids.clone()
    labels[:, :2] = -100
    return Batch(ids, torch.ones_like(ids), labels, torch.arange(n) % 3, ids=torch.arange(10, 10 + n))


def test_batch_rows_keep_order_and_dataset_ids():
    b = _batch()
    sub = b.rows(torch.tensor([3, 0, 3]))
    assert len(sub) == 3 and sub.ids.tolist() == [13, 10, 13]
    assert torch.equal(sub.input_ids[0], b.input_ids[3]) and sub.domain_ids.tolist() == [0, 0, 0]
    assert set(b.as_dict()) == {"input_ids", "attention_mask", "labels", "domain_ids"}
    assert set(b.model_inputs()) == {"input_ids", "attention_mask", "labels"}


def _engine(micro_batch_size: int = 2) -> Engine:
    return Engine(
        None,  # the selector is not used by _micro_batches
        None,
        None,
        train_batch=lambda ids: {},
        val_batch=lambda ids: {},
        val_domains=torch.zeros(0, dtype=torch.long),
        domains=["a", "b", "c"],
        batch_size=4,
        micro_batch_size=micro_batch_size,
        use_weights=False,
        val_anchors=0,
    )


def test_micro_batches_by_size_or_by_count_with_stand_in_rows():
    pool, w = _batch(), torch.tensor([1.0, 2.0, 3.0])
    chosen = torch.tensor([4, 1, 2])
    by_size = _engine(2)._micro_batches(pool, chosen, w, None)
    assert [m.batch.ids.tolist() for m in by_size] == [[14, 11], [12]]
    by_count = _engine(2)._micro_batches(pool, chosen, w, 2)
    assert [m.batch.ids.tolist() for m in by_count] == [[14, 11], [12]]
    assert [m.weights.tolist() for m in by_count] == [[1.0, 2.0], [3.0]]
    # a rank with fewer rows than the Trainer's accumulation steps: stand-in rows of weight 0
    short = _engine(2)._micro_batches(pool, chosen[:1], w[:1], 3)
    assert [m.padding for m in short] == [False, True, True]
    assert all(m.weights.tolist() == [0.0] for m in short[1:]) and [m.index for m in short] == [0, 1, 2]
    none = _engine(2)._micro_batches(pool, chosen[:0], w[:0], 2)
    assert all(m.padding and len(m.batch) == 1 for m in none)


def test_weighted_loss_is_the_weighted_mean_of_per_example_means_over_the_step():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6], [1, 1, 1, 1, 1]])
    w = torch.tensor([1.0, 0.5, 2.0])
    loss, per_ex, tok = weighted_loss(logits, labels, w, torch.tensor(7.0), world_size=2)
    oracle = []
    for i in range(3):
        ce = torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], reduction="none", ignore_index=-100)
        oracle.append(ce[labels[i, 1:] != -100].mean())
    oracle = torch.stack(oracle).float()
    torch.testing.assert_close(per_ex.float(), oracle)
    torch.testing.assert_close(loss.float(), (oracle * w).sum() / 7.0 * 2)
    assert tok.shape == (3, 4) and bool((tok[labels[:, 1:] == -100] == 0).all())


def test_doge_is_fed_no_validation_gradient_unless_its_target_reads_it():
    domains = ["a", "b"]
    others = OnlineReweighter(get_reweighter("doge", domains=domains))
    validation = OnlineReweighter(get_reweighter("doge", domains=domains, target="validation"))
    dograph = OnlineReweighter(get_reweighter("dograph", domains=domains))
    assert others.needs_grad and not others.needs_val_grad
    assert validation.needs_val_grad and dograph.needs_val_grad
    assert not OnlineReweighter(get_reweighter("uniform", domains=domains)).needs_grad


def test_online_reweighter_refuses_unknown_gradient_rows():
    with pytest.raises(ValueError, match="grad_rows"):
        OnlineReweighter(get_reweighter("uniform", domains=["a"]), grad_rows="everything")
