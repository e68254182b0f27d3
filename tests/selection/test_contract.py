"""Every registered selector: names, exactly k unique indices, determinism, declared features, state."""

import io

import pytest
import torch

from mixsel import available_selectors, get_selector
from mixsel.selection import FEATURE_NAMES, Pool
from mixsel.selection.budgets import proportional_budgets

EXPECTED = {
    "random", "stratified", "partitionsel", "colm", "greats", "gradmatch", "craig", "per_domain",
    "grad_norm", "big_loss", "middle_ppl", "completion_length", "least_confidence", "hidden_fl",
}  # fmt: skip
BUDGETED = {"stratified", "partitionsel", "per_domain"}


def _features(n=20, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, d, generator=gen, dtype=torch.float64)
    val = torch.randn(2, d, generator=gen, dtype=torch.float64)
    loss = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    return {
        "loss": loss,
        "perplexity": loss.exp(),
        "confidence": torch.rand(n, generator=gen, dtype=torch.float64),
        "completion_length": torch.randint(1, 50, (n,), generator=gen),
        "grads": grads,
        "grad_norm": grads.norm(dim=1),
        "gram": grads @ grads.T,
        "val_scores": grads @ val.T,
        "val_gram": val @ val.T,
        "hidden": torch.randn(n, 5, generator=gen, dtype=torch.float64),
        "zo_grads": torch.randn(n, 12, generator=gen, dtype=torch.float64),
    }


DOMAINS = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)


def _pool(selector, step=0):
    feats = {k: v for k, v in _features().items() if k in selector.requires}
    sizes = torch.tensor([100, 60, 40])  # dataset-level source sizes (CoLM's small sources)
    return Pool(domains=DOMAINS, num_domains=3, features=feats, step=step, lr=1e-2, seed=5, source_sizes=sizes)


def test_registry_has_every_public_name():
    assert set(available_selectors()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract(name):
    k = 7
    sel_a = get_selector(name).select(_pool(get_selector(name)), k)
    sel_b = get_selector(name).select(_pool(get_selector(name)), k)
    assert set(get_selector(name).requires) <= FEATURE_NAMES
    idx = sel_a.indices.tolist()
    assert len(idx) == k and len(set(idx)) == k and all(0 <= i < 20 for i in idx)
    assert sel_a.weights.shape == (k,) and torch.isfinite(sel_a.weights).all()
    assert torch.equal(sel_a.indices, sel_b.indices)
    if name in BUDGETED:
        expected = proportional_budgets(torch.bincount(DOMAINS), k)
        assert torch.bincount(DOMAINS[sel_a.indices], minlength=3).tolist() == expected.tolist()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_round_trip_through_torch_save(name):
    a = get_selector(name)
    a.select(_pool(a), 6)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = get_selector(name)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a.select(_pool(a, step=1), 6).indices, b.select(_pool(b, step=1), 6).indices)
