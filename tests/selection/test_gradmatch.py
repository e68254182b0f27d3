import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool


def _pool(g):
    g = torch.tensor(g, dtype=torch.float64)
    return Pool(domains=torch.zeros(g.shape[0], dtype=torch.long), num_domains=1, features={"gram": g @ g.T})


def test_hand_computed_omp():
    # pool gradient t = sum_i g_i = (3, 11/5); correlations <g_i, t> = (6, 11/5, 5.64): pick 0;
    # residual (0, 11/5) correlates 11/5 with g1 and 2.64 with g2: pick 2; exact refit
    # t = w0 (2, 0) + w2 (1, 1.2) gives w2 = 11/6, w0 = 7/12 and a zero residual, so the pursuit stops
    sel = get_selector("gradmatch").select(_pool([[2.0, 0.0], [0.0, 1.0], [1.0, 1.2]]), 3)
    # cords' fill: the third slot is a random pick among the rest (only example 1 is left), weight 1
    assert sel.indices.tolist() == [0, 2, 1]
    torch.testing.assert_close(sel.weights, torch.tensor([7 / 12, 11 / 6, 1.0]), atol=1e-6, rtol=0)
    assert sel.residual == 0.0 or sel.residual < 1e-6
    assert sel.info["random_fill"] == 1
    # the other rule: zero-weight picks of largest residual correlation
    res = get_selector("gradmatch", fill="residual").select(_pool([[2.0, 0.0], [0.0, 1.0], [1.0, 1.2]]), 3)
    assert res.indices.tolist() == [0, 2, 1]
    torch.testing.assert_close(res.weights, torch.tensor([7 / 12, 11 / 6, 0.0]), atol=1e-6, rtol=0)
    assert res.info["solver"]["filled"] == 1 and res.info["random_fill"] == 0


def test_random_fill_is_seeded_by_the_pool_and_avoids_picked_examples():
    # one example equals the pool gradient: the pursuit stops after it, the other 3 slots are random
    g = [[3.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.5, 0.2], [0.5, -0.2]]
    a = get_selector("gradmatch").select(_pool(g), 4)
    b = get_selector("gradmatch").select(_pool(g), 4)
    assert torch.equal(a.indices, b.indices)
    assert a.indices[0] == 0 and a.info["random_fill"] == 3
    assert len(set(a.indices.tolist())) == 4
    assert a.weights[1:].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="fill="):
        get_selector("gradmatch", fill="zero")


def test_example_equal_to_the_mean_is_picked_first_with_weight_n():
    # g0 = mean of the pool, so the pool gradient is 3 g0; every correlation equals 3 (ties -> index 0)
    sel = get_selector("gradmatch").select(_pool([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0]]), 2)
    assert sel.indices[0] == 0
    assert float(sel.weights[0]) == 3.0
    assert sel.residual < 1e-6
    assert len(set(sel.indices.tolist())) == 2


def test_deterministic_and_k_unique_on_random_pool():
    g = torch.randn(20, 5, generator=torch.Generator().manual_seed(1)).tolist()
    a = get_selector("gradmatch").select(_pool(g), 7)
    b = get_selector("gradmatch").select(_pool(g), 7)
    assert torch.equal(a.indices, b.indices) and len(set(a.indices.tolist())) == 7
    assert (a.weights >= 0).all()
