import torch

from mixsel import get_selector
from mixsel.selection import Pool


def _pool(g):
    g = torch.tensor(g, dtype=torch.float64)
    return Pool(domains=torch.zeros(g.shape[0], dtype=torch.long), num_domains=1, features={"gram": g @ g.T})


def test_hand_computed_omp():
    # mean gbar = (1, 11/15); correlations <g_i, gbar> = (2, 11/15, 1.88): pick 0 (w0 = 1/2);
    # residual (0, 11/15) correlates 11/15 with g1 and 0.88 with g2: pick 2; exact refit
    # gbar = w0 (2, 0) + w2 (1, 1.2) gives w2 = 11/18, w0 = 7/36 and a zero residual
    sel = get_selector("gradmatch").select(_pool([[2.0, 0.0], [0.0, 1.0], [1.0, 1.2]]), 3)
    assert sel.indices.tolist() == [0, 2, 1]  # the third slot is a zero-weight fill
    torch.testing.assert_close(sel.weights, torch.tensor([7 / 36, 11 / 18, 0.0]), atol=1e-6, rtol=0)
    assert sel.residual == 0.0 or sel.residual < 1e-6
    assert sel.info["solver"]["filled"] == 1


def test_example_equal_to_the_mean_is_picked_first_with_weight_one():
    # g0 = mean of the pool; every correlation equals ||gbar||^2 = 1 (ties -> index 0)
    sel = get_selector("gradmatch").select(_pool([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0]]), 2)
    assert sel.indices[0] == 0
    assert float(sel.weights[0]) == 1.0
    assert sel.residual < 1e-6
    assert len(set(sel.indices.tolist())) == 2


def test_deterministic_and_k_unique_on_random_pool():
    g = torch.randn(20, 5, generator=torch.Generator().manual_seed(1)).tolist()
    a = get_selector("gradmatch").select(_pool(g), 7)
    b = get_selector("gradmatch").select(_pool(g), 7)
    assert torch.equal(a.indices, b.indices) and len(set(a.indices.tolist())) == 7
    assert (a.weights >= 0).all()
