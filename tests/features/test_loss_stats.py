"""Per-example loss and the scalar signals of one forward, against loops and hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixsel.features import forward_stats, mean_pool, per_example_loss

from conftest import make_batch, make_tiny_llama


def test_per_example_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[0, :3] = -100
    labels[2] = -100  # no target: loss 0, no NaN
    labels[3, 0] = -100  # position 0 is never a target after the shift anyway
    got = per_example_loss(logits, labels)
    for i in range(4):
        terms = [F.cross_entropy(logits[i, t], labels[i, t + 1]) for t in range(5) if labels[i, t + 1] != -100]
        want = torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)
        assert got[i].item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    got.sum().backward()  # differentiable, finite
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[2] == 0)


def test_per_example_loss_hand_value():
    # uniform logits over 4 classes: CE = log 4 for each target
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 1, 2]])
    assert per_example_loss(logits, labels).item() == pytest.approx(math.log(4))


def test_per_example_loss_shape_error():
    with pytest.raises(ValueError, match="logits must be"):
        per_example_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_forward_stats_match_model_loss_and_loops():
    model = make_tiny_llama(dtype=torch.float64)
    batch = make_batch(n=5, seq_len=10, seed=3)
    batch["labels"][1] = -100
    s = forward_stats(model, batch, hidden=True, factors=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(s["loss"], per_example_loss(logits, batch["labels"]), rtol=1e-12, atol=1e-12)
    assert s["loss"][1] == 0 and s["confidence"][1] == 0 and s["completion_length"][1] == 0
    for i in (0, 2, 4):
        y = batch["labels"][i, 1:]
        keep = y != -100
        p = logits[i, :-1].softmax(-1)[keep].gather(-1, y[keep, None]).squeeze(-1)
        assert s["confidence"][i].item() == pytest.approx(p.mean().item(), rel=1e-12)
        assert s["completion_length"][i].item() == keep.sum().item()
    assert torch.allclose(s["perplexity"], s["loss"].exp())
    # one-example i alone gives the same loss: examples do not interact through padding
    one = {k: v[2:3] for k, v in batch.items()}
    assert forward_stats(model, one)["loss"].item() == pytest.approx(s["loss"][2].item(), rel=1e-10)
    # hidden = mean over attended tokens of the LM head input
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = mean_pool(out.last_hidden_state, batch["attention_mask"])
    assert torch.allclose(s["hidden"], want, rtol=1e-10, atol=1e-12)
    f = s["lm_head"]
    assert f.err.shape[-1] == 97 and f.h.shape[-1] == 32
    assert torch.equal(f.counts, s["completion_length"].long())


def test_mean_pool_hand_value():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    assert mean_pool(h, torch.tensor([[0, 0, 0]])).tolist() == [[0.0, 0.0]]
