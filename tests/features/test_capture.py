"""Gradient features captured in a training step's backward equal the separate pass on the same rows."""

from __future__ import annotations

import pytest
import torch
from features_oracle import per_sample_grads, rel_err

from mixsel import bookkeeping
from mixsel.features import per_example_loss, pool_gradient_features
from mixsel.features.capture import GradientCapture

from conftest import make_batch, make_tiny_llama

V_PROJ = "model.layers.1.self_attn.v_proj"


def _train_step(model, batch, weights, capture, micro=4, scale=2.0):
    """A weighted, micro-batched backward as mixsel train runs it (the loss times an arbitrary scale)."""
    model.zero_grad(set_to_none=True)
    total = weights.sum()
    with capture:
        for s in range(0, batch["input_ids"].shape[0], micro):
            rows = slice(s, s + micro)
            logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
            per_ex = per_example_loss(logits, batch["labels"][rows])
            capture.watch(per_ex)
            (per_ex * weights[rows]).sum().div(total).mul(scale).backward()


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(dtype=torch.float64)
    batch = make_batch(n=7, seq_len=11, seed=3)
    # powers of two summing to 8: every row's factor w_i * scale / total is a power of two, so the
    # unscaled gradients are bit-identical to the unweighted ones (HF's RMSNorm computes in float32
    # even in a float64 model, so any other scale would round differently, ~1e-7)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    return model, batch, weights


@pytest.mark.parametrize(
    ("source", "modules", "dim"),
    [("lm_head", None, 64), ("linear", [V_PROJ], 64), ("linear", [V_PROJ, "model.layers.0.mlp.up_proj"], 96)],
)
def test_captured_features_equal_the_separate_pass(setup, source, modules, dim):
    model, batch, weights = setup
    cap = bookkeeping.gradient_capture(model, source=source, modules=modules, projection_dim=dim, seed=4)
    _train_step(model, batch, weights, cap)
    feats, missing = cap.features()
    assert not missing.any()
    want = pool_gradient_features(
        model, batch, source=source, modules=modules, projection_dim=dim, seed=4, need=("grads",)
    )["grads"]
    assert feats.shape == want.shape
    assert rel_err(feats, want) <= 1e-10


def test_exact_capture_matches_the_oracle(setup):
    model, batch, weights = setup
    oracle = per_sample_grads(model, batch, [V_PROJ + ".weight"])
    cap = GradientCapture(model, [V_PROJ], projection_dim=None, seed=0)
    _train_step(model, batch, weights, cap, micro=3)
    assert rel_err(cap.features()[0], oracle) <= 1e-10
    cap = GradientCapture(model, [V_PROJ], projection_dim=None, seed=0)  # any weights: float32 RMSNorm rounding
    _train_step(model, batch, torch.tensor([0.3, 1.7, 2.2, 0.9, 1.1, 0.4, 5.0], dtype=torch.float64), cap, scale=3.0)
    assert rel_err(cap.features()[0], oracle) <= 1e-6


def test_rows_without_weight_are_recomputed(setup):
    model, batch, weights = setup
    w = weights.clone()
    w[2] = 0.0
    domains = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    kw = {"source": "lm_head", "modules": None, "projection_dim": 32, "seed": 1}
    cap = bookkeeping.gradient_capture(model, **kw)
    _train_step(model, batch, w, cap)
    assert cap.features()[1].tolist() == [False, False, True, False, False, False, False]
    got = bookkeeping.captured_domain_gradients(cap, batch, domains, 3, model=model, **kw)
    want, _ = bookkeeping.domain_gradients(model, batch, domains, 3, val_batch=None, **kw)
    assert rel_err(got, want) <= 1e-10


def test_capture_errors(setup):
    model, batch, _ = setup
    cap = GradientCapture(model, [V_PROJ], projection_dim=16, seed=0)
    with pytest.raises(RuntimeError, match="saw no micro-batch"):
        cap.features()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="inside the training forward"):
        cap.watch(per_example_loss(logits, batch["labels"]))
