"""CoLM zeroth-order features, Adam normalisation and top-h masks."""

from __future__ import annotations

import pytest
import torch

from mixsel.features import (
    AdamNormalizer,
    find_last_module,
    forward_stats,
    linear_grads,
    spsa_direction,
    spsa_features,
    topk_source_mask,
)
from mixsel.solvers import pairwise_l1

from conftest import make_batch, make_tiny_llama


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(dtype=torch.float64)


@pytest.fixture(scope="module")
def batch():
    b = make_batch(n=5, seq_len=10, seed=4)
    b["labels"][3] = -100
    return b


def test_two_pass_trick_equals_full_model_finite_difference(model64, batch):
    eps = 1e-3
    est = spsa_features(model64, batch, eps=eps, seed=7, num_directions=2)
    assert est.module == "model.layers.1.self_attn.v_proj"
    weight = model64.get_submodule(est.module).weight
    before = weight.detach().clone()
    for k in range(2):
        z = spsa_direction(7, k, tuple(weight.shape), dtype=torch.float64)
        with torch.no_grad():
            weight.add_(eps * z)
            plus = forward_stats(model64, batch)["loss"]
            weight.sub_(2 * eps * z)
            minus = forward_stats(model64, batch)["loss"]
            weight.copy_(before)
        assert torch.allclose(est.coefficients[:, k], (plus - minus) / (2 * eps), rtol=1e-9, atol=1e-12)
    assert torch.equal(weight, before)  # weights restored
    assert est.coefficients[3].abs().max() == 0  # no targets, no signal


def test_spsa_directional_derivative_matches_exact_gradient(model64, batch):
    # HF's RMSNorm computes in float32 even in a float64 model, so the central difference is limited
    # by ~1e-7 round-off / eps; at eps = 3e-4 both that and the O(eps^2) term are ~1e-5.
    est = spsa_features(model64, batch, eps=3e-4, seed=1, num_directions=3)
    exact = linear_grads(model64, batch, est.module)
    want = exact @ est.directions().T  # <grad_i, z_k>
    assert (est.coefficients - want).abs().max() <= 1e-4 * want.abs().max()
    assert est.features().shape == exact.shape
    assert est.hidden_size == 32


def test_spsa_average_approaches_exact_lora_b_gradient(batch):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama(dtype=torch.float32)  # float32: also the training dtype path
    model = peft.get_peft_model(base, peft.LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    model.eval()
    est = spsa_features(model, batch, eps=1e-3, seed=0, num_directions=200)
    assert est.module == find_last_module(model, "v_proj")
    assert est.module.endswith("lora_B.default") and est.dim == 16 * 1
    exact = linear_grads(model, batch, est.module)
    approx = est.features()
    for i in (0, 1, 2, 4):
        cos = torch.nn.functional.cosine_similarity(approx[i], exact[i], dim=0)
        assert cos >= 0.9, (i, cos)
    # a single direction is a rank-one reconstruction z z^T g (Eq. 5)
    one = spsa_features(model, batch, eps=1e-3, seed=0, num_directions=1)
    z = one.directions()[0]
    rank_one = (exact @ z)[:, None] * z[None, :]
    assert (one.features() - rank_one).norm() <= 1e-2 * rank_one.norm()


def test_adam_normalizer_hand_values_and_round_trip():
    norm = AdamNormalizer(beta1=0.5, beta2=0.5, eps=0.0)
    g1 = torch.tensor([[2.0, -1.0], [4.0, 0.5]], dtype=torch.float64)
    # step 1, no history: m = 0.5 g / 0.5 = g, v = g^2 -> sign(g)
    assert norm.normalize(g1).tolist() == [[1.0, -1.0], [1.0, 1.0]]
    norm.update(g1, mask=torch.tensor([True, False]))  # only the first row (a "big source")
    assert norm.step == 1
    assert norm.m.tolist() == [1.0, -0.5] and norm.v.tolist() == [2.0, 0.5]
    g2 = torch.tensor([[4.0, 1.0]], dtype=torch.float64)
    # step 2: m = (0.5*1 + 0.5*4)/0.75 = 10/3; v = (0.5*2 + 0.5*16)/0.75 = 12
    #         second coordinate: m = (0.5*-0.5 + 0.5*1)/0.75 = 1/3; v = (0.25 + 0.5)/0.75 = 1
    want = torch.tensor([[(10 / 3) / 12**0.5, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(norm.normalize(g2), want, rtol=1e-12)
    state = norm.state_dict()
    fresh = AdamNormalizer()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.normalize(g2), norm.normalize(g2)) and fresh.step == 1
    norm.update(torch.zeros(0, 2, dtype=torch.float64))  # no rows: unchanged
    assert norm.step == 1
    with pytest.raises(ValueError, match="dimension"):
        norm.normalize(torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({"m": None})


def test_topk_source_mask_and_l1():
    feats = torch.tensor(
        [
            [3.0, -1.0, 0.0, 2.0],
            [1.0, -3.0, 0.0, 2.0],  # source 0 mean: [2, -2, 0, 2]
            [0.0, 0.0, 5.0, -1.0],  # source 2 mean: [0, 0, 5, -1]
        ]
    )
    domains = torch.tensor([0, 0, 2])
    mask = topk_source_mask(feats, domains, h=2, num_domains=3)
    # source 0: |mean| ties at 2 for coordinates 0, 1, 3 -> lowest indices win (stable)
    assert mask.tolist() == [
        [True, True, False, False],
        [False, False, False, False],
        [False, False, True, True],
    ]
    assert topk_source_mask(feats, domains, hidden_size=1)[2].tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="hidden_size"):
        topk_source_mask(feats, domains)
    d = pairwise_l1(feats[:, mask[0]])  # CoLM's distances on source 0's sparsified coordinates
    assert d.tolist() == [[0.0, 4.0, 4.0], [4.0, 0.0, 4.0], [4.0, 4.0, 0.0]]
    assert pairwise_l1(feats)[0, 2].item() == 3 + 1 + 5 + 3
