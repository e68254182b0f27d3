"""OnlineSelector: features -> selection -> diagnostics and the time split, against independent oracles."""

import pytest
import torch

from mixsel import get_selector
from mixsel.config import FeatureConfig
from mixsel.features import block_modules
from mixsel.step import OnlineSelector, resolve_features

from conftest import make_batch, make_tiny_llama


def _pool(n: int = 8) -> dict[str, torch.Tensor]:
    batch = make_batch(n=n, seq_len=10, seed=3)
    batch["domain_ids"] = torch.tensor([i % 2 for i in range(n)])
    return batch


def _param_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Per-example gradients of ``params``, one backward per example (the oracle)."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        out = model(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
            labels=batch["labels"][i : i + 1],
        )
        out.loss.backward()
        rows.append(torch.cat([p.grad.detach().flatten().clone() for p in params]))
    model.zero_grad()
    return torch.stack(rows)


def _head_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return _param_grads(model, batch, [model.get_output_embeddings().weight])


def test_partitionsel_step_diagnostics_match_brute_force_conflicts():
    model = make_tiny_llama(dtype=torch.float64)
    pool, val = _pool(8), make_batch(n=2, seq_len=10, seed=4)
    online = OnlineSelector(get_selector("partitionsel"), FeatureConfig(), num_domains=2, diagnostics=True)
    assert (online.features.source, online.features.normalize) == ("blocks", True)  # PartitionSel's features
    result = online(model, pool, 4, step=0, val_batch=val)
    picked = result.selection.indices.tolist()
    assert len(set(picked)) == 4 and all(0 <= i < 8 for i in picked)

    # the signs of the (normalised) inner products are those of the raw last-block gradients
    grads = _param_grads(model, pool, [model.get_submodule(n).weight for n in block_modules(model, 3)])
    gram = grads @ grads.T
    want = sum(1 for a in range(4) for b in range(a + 1, 4) if gram[picked[a], picked[b]] < 0)
    assert want > 0  # the instance has conflicts to count
    assert result.metrics["select/conflicts"] == want

    m = result.metrics
    assert 0.0 < m["time/forward"] <= m["time/features"]
    assert m["time/solver"] >= 0.0


def test_forward_time_for_scalar_selectors_and_none_for_random():
    model = make_tiny_llama()
    pool = _pool(8)
    loss_based = OnlineSelector(get_selector("big_loss"), FeatureConfig(), num_domains=2)
    m = loss_based(model, pool, 4, step=0).metrics
    assert 0.0 < m["time/forward"] <= m["time/features"]

    random = OnlineSelector(get_selector("random"), FeatureConfig(), num_domains=2)
    assert random(model, pool, 4, step=0).metrics["time/forward"] == 0.0


def test_auto_features_resolve_to_each_selectors_reference():
    auto = FeatureConfig()
    for name in ("partitionsel", "per_domain", "greats"):
        f = resolve_features(auto, get_selector(name))
        assert (f.source, f.normalize, f.blocks) == ("blocks", True, 3)
    for name in ("gradmatch", "craig", "grad_norm"):
        f = resolve_features(auto, get_selector(name))
        assert (f.source, f.normalize) == ("lm_head", False)
    mine = resolve_features(FeatureConfig(source="lm_head", normalize=False), get_selector("partitionsel"))
    assert (mine.source, mine.normalize) == ("lm_head", False)


def test_spsa_direction_is_fixed_for_the_run_by_default():
    model = make_tiny_llama()
    pool = _pool(6)
    fixed = OnlineSelector(get_selector("colm", small_from="pool"), FeatureConfig(), num_domains=2)
    fresh = OnlineSelector(get_selector("colm", small_from="pool"), FeatureConfig(zo_direction="per_step"), 2)
    feats = {}
    for tag, online in (("fixed", fixed), ("fresh", fresh)):
        for step in (0, 5):
            online.step = step
            feats[tag, step] = online.compute_features(model, pool, None)["zo_grads"]
    # rank-one features c_i z: the same z at every step gives parallel rows across steps
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(feats["fixed", 0][0], feats["fixed", 5][0], dim=0).abs()) == pytest.approx(1.0, abs=1e-5)
    assert float(cos(feats["fresh", 0][0], feats["fresh", 5][0], dim=0).abs()) < 0.5
    assert torch.equal(feats["fixed", 0], feats["fresh", 0])  # step 0 draws the run's direction


def test_source_sizes_reach_the_pool_and_colm_requires_them():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="source_sizes"):
        OnlineSelector(get_selector("colm"), FeatureConfig(), num_domains=2)
    online = OnlineSelector(get_selector("colm"), FeatureConfig(), 2, source_sizes=torch.tensor([100, 5]))
    result = online(model, _pool(8), 4, step=0)
    assert result.selection.info["small_sources"] == [1]  # small in the dataset, not in the pool
