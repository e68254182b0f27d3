"""PartitionSel's default features: per-example gradients of the last 3 blocks' linear layers / LoRA A,B.

Checked against an independent per-example backward of exactly those parameters (torch.func vmap,
float64) on a 4-block Llama built from a config and on a peft LoRA model of it.
"""

from __future__ import annotations

import pytest
import torch
from features_oracle import per_sample_grads, rel_err

from mixsel.features import block_modules, decoder_layers, pool_gradient_features

from conftest import make_batch, make_tiny_llama

TOL = 1e-6
LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEAR += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def model4():
    return make_tiny_llama(layers=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def lora4():
    peft = pytest.importorskip("peft")
    base = make_tiny_llama(layers=4, dtype=torch.float64)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # LoRA B starts at zero; make both factors non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    return model.eval()


@pytest.fixture(scope="module")
def pool():
    b = make_batch(n=5, seq_len=10, seed=1)
    b["labels"][3] = -100  # no target: a zero gradient, no NaN
    return b


@pytest.fixture(scope="module")
def val():
    return make_batch(n=3, seq_len=9, seed=2)


def _full_ft_names() -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in (1, 2, 3) for m in LINEAR]


def test_block_modules_are_the_last_three_blocks_linear_layers(model4):
    names = block_modules(model4, 3)
    assert names == [n.removesuffix(".weight") for n in _full_ft_names()]
    assert decoder_layers(model4)[0] == "model.layers"
    assert len(block_modules(model4, 0)) == 4 * 7  # every block
    assert len(block_modules(model4, 9)) == 4 * 7  # capped at the number of blocks
    with pytest.raises(ValueError, match="blocks=-1"):
        block_modules(model4, -1)


def test_block_modules_under_peft_are_lora_a_and_b(lora4):
    names = block_modules(lora4, 3)
    assert len(names) == 3 * 3 * 2  # 3 blocks x (q, v, down) x (A, B)
    assert names[0].endswith("model.layers.1.self_attn.q_proj.lora_A.default")
    assert names[1].endswith("model.layers.1.self_attn.q_proj.lora_B.default")
    assert names[-1].endswith("model.layers.3.mlp.down_proj.lora_B.default")


def test_blocks_features_match_per_example_backward_full_ft(model4, pool, val):
    ref = per_sample_grads(model4, pool, _full_ft_names())
    ref_val = per_sample_grads(model4, val, _full_ft_names())
    # per block: q, o 32 x 32; k, v 16 x 32 (2 KV heads of 8); gate, up 64 x 32; down 32 x 64
    assert ref.shape == (5, 3 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32))
    for method in ("ghost", "materialize"):
        f = pool_gradient_features(
            model4, pool, val, source="blocks", need=("gram", "val_scores", "val_gram", "grad_norm"), method=method
        )
        assert rel_err(f["gram"], ref @ ref.T) <= TOL
        assert rel_err(f["val_scores"], ref @ ref_val.T) <= TOL
        assert rel_err(f["val_gram"], ref_val @ ref_val.T) <= TOL
        assert rel_err(f["grad_norm"], ref.norm(dim=1)) <= TOL
    g = pool_gradient_features(model4, pool, source="blocks", need=("grads",))["grads"]
    assert rel_err(g, ref) <= TOL
    assert torch.all(g[3] == 0)


def test_normalized_blocks_features_are_cosines(model4, pool, val):
    ref = per_sample_grads(model4, pool, _full_ft_names())
    ref_val = per_sample_grads(model4, val, _full_ft_names())
    unit = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit_val = ref_val / ref_val.norm(dim=1, keepdim=True)
    f = pool_gradient_features(model4, pool, val, source="blocks", normalize=True, need=("gram", "val_scores"))
    assert rel_err(f["gram"], unit @ unit.T) <= TOL
    assert rel_err(f["val_scores"], unit @ unit_val.T) <= TOL
    keep = [0, 1, 2, 4]  # the example without targets stays a zero row
    assert torch.allclose(f["gram"].diagonal()[keep], torch.ones(4, dtype=torch.float64))


def test_blocks_features_match_per_example_backward_lora(lora4, pool, val):
    names = [f"{n}.weight" for n in block_modules(lora4, 3)]
    ref = per_sample_grads(lora4, pool, names)
    ref_val = per_sample_grads(lora4, val, names)
    f = pool_gradient_features(lora4, pool, val, source="blocks", need=("gram", "val_scores", "grads"))
    assert rel_err(f["grads"], ref) <= TOL
    assert rel_err(f["gram"], ref @ ref.T) <= TOL
    assert rel_err(f["val_scores"], ref @ ref_val.T) <= TOL


def test_projected_blocks_features_are_seeded_and_small(model4, pool):
    a = pool_gradient_features(model4, pool, source="blocks", projection_dim=84, need=("grads",), seed=3)["grads"]
    b = pool_gradient_features(model4, pool, source="blocks", projection_dim=84, need=("grads",), seed=3)["grads"]
    assert a.shape == (5, 84)  # 84 // 21 modules = 4 coordinates per module
    assert torch.equal(a, b)


def test_blocks_need_no_hidden_and_a_block_list(model4, pool):
    with pytest.raises(ValueError, match="hidden"):
        pool_gradient_features(model4, pool, source="blocks", need=("gram", "hidden"))
    with pytest.raises(ValueError, match="ModuleList"):
        block_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_capture_in_row_chunks_equals_one_pass(model4, pool):
    """The chunked capture (one row per chunk here) gives the same factors, stats and grams as one pass."""
    from mixsel.features import capture_linear_factors, factor_gram
    from mixsel.features.grads import factor_grams

    names = block_modules(model4, 3)
    flags = [p.requires_grad for p in model4.parameters()]
    whole, s1 = capture_linear_factors(model4, pool, names)
    rows, s2 = capture_linear_factors(model4, pool, names, graph_bytes=1)
    assert [p.requires_grad for p in model4.parameters()] == flags  # restored
    for a, b in zip(whole, rows):
        assert torch.allclose(a.out_grads, b.out_grads, rtol=1e-12, atol=1e-14)
        assert torch.allclose(a.inputs, b.inputs, rtol=1e-12, atol=1e-14)
    for key in s1:
        assert torch.allclose(s1[key], s2[key], rtol=1e-12, atol=1e-12)
    assert whole[0].inputs is whole[1].inputs is whole[2].inputs  # q, k, v read one input: one tensor
    g = per_sample_grads(model4, pool, [n + ".weight" for n in names[:7]])
    for method in ("materialize", "ghost"):  # every product of one module in one sweep
        one, _ = factor_grams(whole[5], rows[5], {"gram", "sq", "cross", "val_gram"}, method=method)
        gram = factor_gram(whole[5], method=method)[0]
        for key in ("gram", "cross", "val_gram"):
            assert rel_err(one[key], gram) <= 1e-12
        assert rel_err(one["sq"], gram.diagonal()) <= 1e-12
    assert rel_err(sum(factor_gram(f)[0] for f in whole[:7]), g @ g.T) <= TOL


def test_selections_from_the_chunked_capture_equal_the_oracles():
    """PartitionSel, per_domain and GREATS pick the same rows from the float32 chunked capture as from
    the float64 per-example backward of the same weights."""
    import copy

    from mixsel.registry import get_selector
    from mixsel.selection.base import Pool

    model = make_tiny_llama(layers=4, seed=3)
    batch, val = make_batch(n=16, seq_len=12, seed=5), make_batch(n=4, seq_len=10, seed=6)
    need = ("gram", "val_scores", "val_gram")
    got = pool_gradient_features(model, batch, val, source="blocks", normalize=True, need=need)
    m64 = copy.deepcopy(model).double()
    names = [n + ".weight" for n in block_modules(m64, 3)]
    g, gv = per_sample_grads(m64, batch, names), per_sample_grads(m64, val, names)
    g, gv = g / g.norm(dim=1, keepdim=True), gv / gv.norm(dim=1, keepdim=True)
    want = {"gram": g @ g.T, "val_scores": g @ gv.T, "val_gram": gv @ gv.T}
    for key in need:
        assert rel_err(got[key].double(), want[key]) <= 1e-4
    domains = torch.arange(16) % 3
    for name in ("partitionsel", "per_domain", "greats"):
        sel = get_selector(name)
        picks = []
        for feats in (got, want):
            pool = Pool(domains=domains, num_domains=3, features={k: feats[k] for k in sel.requires}, step=2, seed=1)
            picks.append(sel.select(pool, 5).indices.tolist())
        assert picks[0] == picks[1], name
