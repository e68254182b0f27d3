"""Exact per-example gradients and Gram matrices vs the torch.func oracle (float64, padding, -100)."""

from __future__ import annotations

import logging

import pytest
import torch
from features_oracle import per_sample_grads, rel_err

from mixsel.features import (
    find_last_module,
    last_layer_grads,
    last_layer_gram,
    linear_grads,
    linear_gram,
)
from mixsel.features.grads import factor_gram, ghost_gram
from mixsel.features.loss import GradFactors
from mixsel.features.pool import pool_gradient_features

from conftest import make_batch, make_tiny_llama

TOL = 1e-6


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(dtype=torch.float64)


@pytest.fixture(scope="module")
def pool():
    b = make_batch(n=6, seq_len=12, seed=1)
    b["labels"][4] = -100  # an example without targets: zero gradient, no NaN
    return b


@pytest.fixture(scope="module")
def val():
    return make_batch(n=3, seq_len=10, seed=2)


@pytest.fixture(scope="module")
def head_oracle(model64, pool, val):
    return (
        per_sample_grads(model64, pool, ["lm_head.weight"]),
        per_sample_grads(model64, val, ["lm_head.weight"]),
    )


def test_last_layer_grads_match_vmap(model64, pool, head_oracle):
    g = last_layer_grads(model64, pool)
    ref, _ = head_oracle
    assert g.shape == (6, 97 * 32)
    assert rel_err(g, ref) <= TOL
    assert torch.all(g[4] == 0)


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
def test_last_layer_gram_self_and_cross(model64, pool, val, head_oracle, method):
    ref, ref_val = head_oracle
    k, info = last_layer_gram(model64, pool, method=method, return_info=True)
    assert info["method"] in ("ghost", "materialize")
    if method != "auto":
        assert info["method"] == method
    assert rel_err(k, ref @ ref.T) <= TOL
    kc = last_layer_gram(model64, pool, val, method=method)
    assert kc.shape == (6, 3)
    assert rel_err(kc, ref @ ref_val.T) <= TOL


def test_ghost_chunking_is_exact(model64, pool, val, head_oracle):
    ref, ref_val = head_oracle
    k = last_layer_gram(model64, pool, method="ghost", chunk=5)  # many uneven token blocks
    assert rel_err(k, ref @ ref.T) <= TOL
    kc = last_layer_gram(model64, pool, val, method="ghost", chunk=7)
    assert rel_err(kc, ref @ ref_val.T) <= TOL


def test_auto_says_which_backend(model64, pool, caplog):
    with caplog.at_level(logging.INFO, logger="mixsel.features.grads"):
        _, info = last_layer_gram(model64, pool, return_info=True)
    assert info["method"] in caplog.text
    expected = "ghost" if info["ghost_flops"] <= info["materialize_flops"] else "materialize"
    assert info["method"] == expected
    # a tiny memory cap forbids materialising
    _, info = last_layer_gram(model64, pool, return_info=True, max_bytes=1)
    assert info["method"] == "ghost"


def test_auto_cost_model_prefers_ghost_for_short_sequences():
    # 2 tokens per example, a 50 x 40 weight: ghost ~ N^2 (P+Q) << N P Q
    g = torch.Generator().manual_seed(0)
    f = GradFactors(
        out_grads=torch.randn(4, 2, 50, generator=g, dtype=torch.float64),
        inputs=torch.randn(4, 2, 40, generator=g, dtype=torch.float64),
        mask=torch.ones(4, 2, dtype=torch.bool),
    )
    k, info = factor_gram(f)
    assert info["method"] == "ghost"
    assert torch.allclose(k, factor_gram(f, method="materialize")[0], rtol=1e-12, atol=1e-12)
    # long sequences with a small weight: materialising is cheaper
    f2 = GradFactors(
        out_grads=torch.randn(4, 64, 3, generator=g, dtype=torch.float64),
        inputs=torch.randn(4, 64, 2, generator=g, dtype=torch.float64),
        mask=torch.ones(4, 64, dtype=torch.bool),
    )
    assert factor_gram(f2)[1]["method"] == "materialize"


def test_ghost_gram_hand_value():
    # one example, two tokens: G = a1 b1^T + a2 b2^T; ||G||^2 by hand
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]], dtype=torch.float64)
    f = GradFactors(a, b, torch.ones(1, 2, dtype=torch.bool))
    # G = [[2, 3, 0], [0, 3, 0]] -> ||G||^2 = 4 + 9 + 9 = 22
    assert ghost_gram(f).item() == pytest.approx(22.0)


def test_grad_norm_is_gram_diagonal(model64, pool, head_oracle):
    ref, _ = head_oracle
    norms = pool_gradient_features(model64, pool, need=("grad_norm",))["grad_norm"]
    assert rel_err(norms, ref.norm(dim=1)) <= TOL
    assert norms[4] == 0


def test_tied_embeddings_use_lm_head_usage(pool):
    model = make_tiny_llama(dtype=torch.float64)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    g = last_layer_grads(model, pool)
    ref = per_sample_grads(model, pool, ["lm_head.weight"], tie_weights=False)
    assert rel_err(g, ref) <= TOL


def test_linear_grads_and_gram_match_vmap(model64, pool, val):
    names = ["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    assert find_last_module(model64, "v_proj") == names[0]
    ref = per_sample_grads(model64, pool, [f"{n}.weight" for n in names])
    ref_val = per_sample_grads(model64, val, [f"{n}.weight" for n in names])
    g = linear_grads(model64, pool, names)
    assert rel_err(g, ref) <= TOL
    one = linear_grads(model64, pool, names[0])  # "1 layer vs 3 layers"
    assert torch.equal(one, g[:, : one.shape[1]])
    for method in ("ghost", "materialize"):
        k = linear_gram(model64, pool, names, method=method)
        assert rel_err(k, ref @ ref.T) <= TOL
        kc, info = linear_gram(model64, pool, names, val, method=method, return_info=True)
        assert info["method"] == method and len(info["modules"]) == 3
        assert rel_err(kc, ref @ ref_val.T) <= TOL
    norms = pool_gradient_features(model64, pool, source="linear", modules=names, need=("grad_norm",))["grad_norm"]
    assert rel_err(norms, ref.norm(dim=1)) <= TOL
    # parameters' requires_grad and .grad are left as they were
    assert all(p.grad is None for p in model64.parameters())


def test_linear_with_bias(pool):
    model = make_tiny_llama(dtype=torch.float64)
    proj = model.model.layers[1].self_attn.v_proj
    new = torch.nn.Linear(proj.in_features, proj.out_features, bias=True, dtype=torch.float64)
    with torch.no_grad():
        new.weight.copy_(proj.weight)
        new.bias.normal_(generator=torch.Generator().manual_seed(3))
    model.model.layers[1].self_attn.v_proj = new
    name = "model.layers.1.self_attn.v_proj"
    ref = per_sample_grads(model, pool, [f"{name}.weight", f"{name}.bias"])
    assert rel_err(linear_grads(model, pool, name), ref) <= TOL
    assert rel_err(linear_gram(model, pool, name, method="ghost"), ref @ ref.T) <= TOL


def test_lora_b_of_last_v_proj(pool, val):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama(dtype=torch.float64)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["v_proj", "q_proj"])
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # LoRA B starts at zero; make both factors non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    model.eval()
    name_b = find_last_module(model, "v_proj")
    name_a = find_last_module(model, "v_proj", lora="A")
    assert name_b.endswith("layers.1.self_attn.v_proj.lora_B.default")
    assert name_a.endswith("layers.1.self_attn.v_proj.lora_A.default")
    names = [name_b, name_a]
    ref = per_sample_grads(model, pool, [f"{n}.weight" for n in names])
    ref_val = per_sample_grads(model, val, [f"{n}.weight" for n in names])
    assert rel_err(linear_grads(model, pool, names), ref) <= TOL
    for method in ("ghost", "materialize"):
        assert rel_err(linear_gram(model, pool, names, val, method=method), ref @ ref_val.T) <= TOL
    assert not model.get_submodule(find_last_module(model, "v_proj", lora="base")).weight.requires_grad


def test_bad_module_errors(model64, pool):
    with pytest.raises(ValueError, match="not found"):
        linear_grads(model64, pool, ["model.layers.9.v_proj"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        linear_grads(model64, pool, ["model.layers.1.self_attn"])
    with pytest.raises(ValueError, match="method"):
        last_layer_gram(model64, pool, method="fast")
    with pytest.raises(ValueError, match="not a peft LoRA layer"):
        find_last_module(model64, "v_proj", lora="B")
