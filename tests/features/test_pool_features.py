"""The pool bridge: every requested feature equals its definition from the exact oracle gradients."""

from __future__ import annotations

import pytest
import torch
from features_oracle import per_sample_grads, rel_err

from mixsel.features import KroneckerProjector, forward_stats, pool_gradient_features

from conftest import make_batch, make_tiny_llama

ALL = ("grads", "gram", "val_scores", "val_gram", "grad_norm")


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(dtype=torch.float64)
    pool = make_batch(n=6, seq_len=10, seed=8)
    val = make_batch(n=2, seq_len=9, seed=9)  # PartitionSel: two validation anchors
    g = per_sample_grads(model, pool, ["lm_head.weight"])
    gv = per_sample_grads(model, val, ["lm_head.weight"])
    return model, pool, val, g, gv


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("normalize", [False, True])
def test_exact_lm_head_features(setup, method, normalize):
    model, pool, val, g, gv = setup
    if normalize:
        gn, gvn = g / g.norm(dim=1, keepdim=True), gv / gv.norm(dim=1, keepdim=True)
    else:
        gn, gvn = g, gv
    need = ("gram", "val_scores", "val_gram", "grad_norm")
    out, info = pool_gradient_features(
        model, pool, val, need=need, normalize=normalize, method=method, return_info=True
    )
    assert set(out) == set(need)
    assert {i["method"] for i in info["gram"]} == {method}
    assert rel_err(out["gram"], gn @ gn.T) <= 1e-6
    assert rel_err(out["val_scores"], gn @ gvn.T) <= 1e-6
    assert rel_err(out["val_gram"], gvn @ gvn.T) <= 1e-6
    assert rel_err(out["grad_norm"], g.norm(dim=1)) <= 1e-6
    # grads asked explicitly: materialised, and everything else consistent with them
    out2 = pool_gradient_features(model, pool, val, need=ALL, normalize=normalize)
    assert rel_err(out2["grads"], gn) <= 1e-6
    assert rel_err(out2["val_scores"], gn @ gvn.T) <= 1e-6


def test_only_what_is_needed_and_scalars_from_the_same_forward(setup):
    model, pool, _, g, _ = setup
    out = pool_gradient_features(model, pool, need=("grad_norm", "loss", "completion_length", "hidden"))
    assert set(out) == {"grad_norm", "loss", "completion_length", "hidden"}
    s = forward_stats(model, pool, hidden=True)
    assert torch.equal(out["loss"], s["loss"]) and torch.equal(out["hidden"], s["hidden"])
    assert rel_err(out["grad_norm"], g.norm(dim=1)) <= 1e-6


def test_projected_lm_head_features(setup):
    model, pool, val, g, gv = setup
    out = pool_gradient_features(model, pool, val, need=ALL, projection_dim=64, seed=5)
    proj = KroneckerProjector(97, 32, 64, seed=5 * 7_919).matrix(torch.float64)
    pg, pgv = g @ proj, gv @ proj
    assert out["grads"].shape == (6, 64)
    assert rel_err(out["grads"], pg) <= 1e-6
    assert rel_err(out["gram"], pg @ pg.T) <= 1e-6
    assert rel_err(out["val_scores"], pg @ pgv.T) <= 1e-6
    again = pool_gradient_features(model, pool, val, need=("grads",), projection_dim=64, seed=5)
    assert torch.equal(again["grads"], out["grads"])


def test_linear_source_default_is_last_v_proj(setup):
    model, pool, val, _, _ = setup
    name = "model.layers.1.self_attn.v_proj.weight"
    g, gv = per_sample_grads(model, pool, [name]), per_sample_grads(model, val, [name])
    out = pool_gradient_features(model, pool, val, source="linear", need=(*ALL, "loss"))
    assert rel_err(out["grads"], g) <= 1e-6
    assert rel_err(out["val_scores"], g @ gv.T) <= 1e-6
    out = pool_gradient_features(model, pool, val, source="linear", need=("gram", "val_scores"), normalize=True)
    gn, gvn = g / g.norm(dim=1, keepdim=True), gv / gv.norm(dim=1, keepdim=True)
    assert rel_err(out["gram"], gn @ gn.T) <= 1e-6
    assert rel_err(out["val_scores"], gn @ gvn.T) <= 1e-6


def test_bridge_errors(setup):
    model, pool, _, _, _ = setup
    with pytest.raises(ValueError, match="val_batch"):
        pool_gradient_features(model, pool, need=("val_scores",))
    with pytest.raises(ValueError, match="unknown"):
        pool_gradient_features(model, pool, need=("gramm",))
    with pytest.raises(ValueError, match="source"):
        pool_gradient_features(model, pool, source="embeddings")
