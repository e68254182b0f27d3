import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool


def _pool(step=0, seed=0):
    return Pool(domains=torch.tensor([0] * 6 + [1] * 3 + [2] * 3), num_domains=3, step=step, seed=seed)


def test_random_is_deterministic_and_unique():
    a = get_selector("random").select(_pool(), 5)
    b = get_selector("random").select(_pool(), 5)
    assert torch.equal(a.indices, b.indices)
    assert len(set(a.indices.tolist())) == 5
    c = get_selector("random").select(_pool(step=1), 5)
    assert not torch.equal(a.indices, c.indices)


def test_stratified_budgets_proportional():
    sel = get_selector("stratified").select(_pool(), 4)
    doms = _pool().domains[sel.indices]
    # quotas 4*[6,3,3]/12 = [2, 1, 1]
    assert torch.bincount(doms, minlength=3).tolist() == [2, 1, 1]


def test_stratified_weights_mode_needs_weights():
    with pytest.raises(ValueError, match="reweighter"):
        get_selector("stratified", budget="weights").select(_pool(), 4)
    pool = _pool()
    pool.domain_weights = torch.tensor([0.0, 0.5, 0.5])
    sel = get_selector("stratified", budget="weights").select(pool, 4)
    assert torch.bincount(pool.domains[sel.indices], minlength=3).tolist() == [0, 2, 2]


def test_k_errors():
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        get_selector("random").select(_pool(), 13)
    with pytest.raises(ValueError, match="positive"):
        get_selector("stratified").select(_pool(), 0)


def test_unknown_selector_lists_names():
    with pytest.raises(KeyError, match="random"):
        get_selector("nope")
