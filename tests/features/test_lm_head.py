"""The chunked inference pass and the LM-head features by vocabulary blocks, against the float64 oracle
and the full-logits path (which they replace in the training step): same values, same selections."""

from __future__ import annotations

import logging

import pytest
import torch
from features_oracle import per_sample_grads, rel_err

from mixsel.features import KroneckerProjector, materialize_grads, pool_gradient_features
from mixsel.features.lm_head import (
    head_grads,
    head_gram,
    head_grams,
    head_pass,
    head_project,
    head_sq_norms,
    target_losses,
)
from mixsel.features.loss import _full_forward_stats, token_losses
from mixsel.registry import get_selector
from mixsel.selection.base import Pool

from conftest import make_batch, make_tiny_llama

SCALARS = ("loss", "confidence", "perplexity", "completion_length")


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(dtype=torch.float64)


@pytest.fixture(scope="module")
def pool():
    b = make_batch(n=6, seq_len=12, seed=1)
    b["labels"][4] = -100  # no target: loss 0, zero gradient
    return b


@pytest.fixture(scope="module")
def val():
    return make_batch(n=3, seq_len=10, seed=2)


@pytest.fixture(scope="module")
def oracle(model64, pool, val):
    return per_sample_grads(model64, pool, ["lm_head.weight"]), per_sample_grads(model64, val, ["lm_head.weight"])


@pytest.mark.parametrize("chunks", [{}, {"row_bytes": 1, "token_bytes": 1}, {"row_bytes": 50_000, "token_bytes": 3000}])
def test_head_pass_equals_the_full_forward(model64, pool, chunks):
    full = _full_forward_stats(model64, pool, hidden=True)
    got = head_pass(model64, pool, hidden=True, **chunks)
    for key in (*SCALARS, "hidden"):
        assert torch.allclose(got[key], full[key], rtol=1e-12, atol=1e-12), key
    assert got["loss"][4] == 0 and got["confidence"][4] == 0
    with torch.no_grad():
        logits = model64(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"]).logits
    per_token = head_pass(model64, pool, token_losses=True, **chunks)["token_losses"]
    assert torch.allclose(per_token, token_losses(logits, pool["labels"]), rtol=1e-12, atol=1e-12)
    assert not got["loss"].is_inference()  # usable (and modifiable) outside inference mode


def test_head_pass_falls_back_loudly_to_the_models_logits(model64, pool, caplog):
    peft = pytest.importorskip("peft")
    import copy

    wrapped = peft.get_peft_model(copy.deepcopy(model64), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with caplog.at_level(logging.WARNING, logger="mixsel.features.lm_head"):
        got = head_pass(wrapped, pool, hidden=True, tokens=True, row_bytes=1)
    assert "not a plain nn.Linear" in caplog.text
    want = head_pass(model64, pool, hidden=True)  # LoRA B starts at zero: the same function
    for key in (*SCALARS, "hidden"):
        assert torch.allclose(got[key], want[key], rtol=1e-12, atol=1e-12), key


def test_blocked_gradient_features_match_the_oracle(model64, pool, val, oracle):
    g, gv = oracle
    f = head_pass(model64, pool, tokens=True)["head_tokens"]
    fv = head_pass(model64, val, tokens=True, token_bytes=1)["head_tokens"]
    tiny = 97 * 8 * 20  # a few vocabulary rows per block
    assert len(f.blocks(fv, max_bytes=tiny)) > 5
    assert rel_err(head_gram(f, max_bytes=tiny), g @ g.T) <= 1e-10
    assert rel_err(head_gram(f, fv, max_bytes=tiny), g @ gv.T) <= 1e-10
    assert rel_err(head_sq_norms(f, max_bytes=tiny), g.square().sum(1)) <= 1e-10
    assert rel_err(head_grads(f, max_bytes=tiny), g) <= 1e-10
    kept = head_pass(model64, pool, tokens=True, keep_err_bytes=10**9)["head_tokens"]
    assert kept.err is not None and f.err is None
    assert rel_err(head_gram(kept, max_bytes=tiny), g @ g.T) <= 1e-10  # the kept err: the same Gram
    assert torch.all(head_grads(f)[4] == 0)
    one = head_grams(f, fv, {"gram", "sq", "cross", "val_gram"}, max_bytes=tiny)  # one sweep, every product
    assert rel_err(one["gram"], g @ g.T) <= 1e-10 and rel_err(one["cross"], g @ gv.T) <= 1e-10
    assert rel_err(one["val_gram"], gv @ gv.T) <= 1e-10 and rel_err(one["sq"], g.square().sum(1)) <= 1e-10
    assert rel_err(head_grams(f, None, {"sq"})["sq"], g.square().sum(1)) <= 1e-10
    in_pass = head_pass(model64, pool, sq_norms=True, token_bytes=97 * 8 * 15)["grad_sq_norm"]  # whole examples
    assert rel_err(in_pass, g.square().sum(1)) <= 1e-10
    norms = pool_gradient_features(model64, pool, need=("grad_norm",), return_info=True)
    assert rel_err(norms[0]["grad_norm"], g.norm(dim=1)) <= 1e-10 and norms[1]["gram"] == [{"method": "in-pass"}]
    assert rel_err(materialize_grads(f.to_factors()), g) <= 1e-10  # the packed layout as GradFactors


def test_projection_from_the_pass_equals_the_dense_projection(model64, pool, oracle):
    g, _ = oracle
    proj = KroneckerProjector(97, 32, 48, seed=3)
    dense = g @ proj.matrix(torch.float64)
    in_pass = head_pass(model64, pool, tokens=True, projector=proj, token_bytes=2000)["head_tokens"]
    assert in_pass.err_out is not None
    assert rel_err(head_project(in_pass, proj), dense) <= 1e-10
    later = head_pass(model64, pool, tokens=True)["head_tokens"]  # no projector: by vocabulary blocks
    assert rel_err(head_project(later, proj, max_bytes=97 * 8 * 20), dense) <= 1e-10


def test_the_pass_never_holds_pool_sized_logits():
    from torch.profiler import ProfilerActivity, profile

    vocab, n, t = 4000, 16, 24
    model = make_tiny_llama(vocab_size=vocab, hidden_size=16)
    batch = make_batch(n=n, seq_len=t, vocab_size=vocab, seed=4)
    logits_bytes = n * t * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        head_pass(model, batch, tokens=True, row_bytes=40_000, token_bytes=logits_bytes // 8)
    cur = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    assert peak < logits_bytes / 2


def test_selections_are_unchanged_by_the_chunked_pass():
    """Every selector that reads LM-head features picks the same rows from both paths (float32 model)."""
    model = make_tiny_llama(vocab_size=97, hidden_size=32, seed=5)
    batch = make_batch(n=24, seq_len=14, seed=6)
    val = make_batch(n=2, seq_len=12, seed=7)
    domains = torch.arange(24) % 3
    need = ("gram", "val_scores", "val_gram", "grad_norm")
    new = pool_gradient_features(model, batch, val, need=need)
    old = pool_gradient_features(model, batch, val, need=need, method="materialize")
    new.update(head_pass(model, batch, hidden=True))
    old.update(_full_forward_stats(model, batch, hidden=True))
    for key in old:
        if key in new and key != "lm_head":
            assert torch.allclose(new[key].double(), old[key].double(), rtol=1e-4, atol=1e-6), key
    methods = [
        "big_loss",
        "middle_ppl",
        "least_confidence",
        "completion_length",
        "hidden_fl",
        "grad_norm",
        "partitionsel",
        "per_domain",
        "greats",
        "gradmatch",
        "craig",
    ]
    for name in methods:
        sel = get_selector(name)
        picks = []
        for feats in (new, old):
            p = Pool(domains=domains, num_domains=3, features={k: feats[k] for k in sel.requires}, step=1, seed=0)
            picks.append(sel.select(p, 6).indices.tolist())
        assert picks[0] == picks[1], name


def test_target_losses_equal_the_full_loss(model64, pool):
    from mixsel.features import per_example_loss

    with torch.no_grad():
        h = model64.model(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"]).last_hidden_state
        want = per_example_loss(model64.lm_head(h), pool["labels"])
        got = target_losses(model64.lm_head, h, pool["labels"], token_bytes=97 * 8 * 5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
