import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool
from mixsel.selection.craig import distances_from_gram


def _pool(g, domains=None):
    g = torch.as_tensor(g, dtype=torch.float64)
    if g.dim() == 1:
        g = g[:, None]
    n = g.shape[0]
    d = torch.zeros(n, dtype=torch.long) if domains is None else torch.as_tensor(domains)
    return Pool(domains=d, num_domains=int(d.max()) + 1, features={"gram": g @ g.T})


def test_distances_from_gram_match_cdist():
    g = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(distances_from_gram(g @ g.T), torch.cdist(g, g), atol=1e-6, rtol=0)


def test_single_medoid_is_the_median_with_weight_n():
    sel = get_selector("craig").select(_pool([0.0, 1.0, 2.0, 20.0, 23.0]), 1)
    # sum of distances: 42 for the median (index 2), larger for every other point
    assert sel.indices.tolist() == [2]
    assert sel.weights.tolist() == [5.0]


def test_two_clusters_one_medoid_each_weighted_by_cluster_size():
    g = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [50.0, 50.0], [51.0, 50.0]]
    sel = get_selector("craig").select(_pool(g), 2)
    clusters = [0 if i < 4 else 1 for i in sel.indices.tolist()]
    assert sorted(clusters) == [0, 1]
    expected = {0: 4.0, 1: 2.0}
    assert sel.weights.tolist() == [expected[c] for c in clusters]
    assert float(sel.weights.sum()) == 6.0  # CRAIG weights sum to n


def test_per_domain_budgets_are_respected():
    g = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [50.0, 50.0], [51.0, 50.0]]
    domains = [0, 0, 0, 1, 1, 1]  # budgets for k=4: [2, 2]
    sel = get_selector("craig", per_domain_budgets=True).select(_pool(g, domains), 4)
    assert torch.bincount(torch.tensor(domains)[sel.indices], minlength=2).tolist() == [2, 2]
    assert len(set(sel.indices.tolist())) == 4
    assert float(sel.weights.sum()) == 6.0


def test_squared_distances_of_cords_pick_the_mean_side_medoid():
    # on [0, 1, 2, 3, 100]: Euclidean distances (the paper) favour the median (2: sum 102 vs 3: 103);
    # squared distances (cords) favour the point nearest the mean (3: sum 9423 vs 2: 9610)
    pool = _pool([0.0, 1.0, 2.0, 3.0, 100.0])
    assert get_selector("craig").select(pool, 1).indices.tolist() == [2]
    assert get_selector("craig", distance="squared").select(pool, 1).indices.tolist() == [3]
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(distances_from_gram(g @ g.T, squared=True), torch.cdist(g, g).square())
    assert get_selector("craig").weighted_loss is True
    with pytest.raises(ValueError, match="distance="):
        get_selector("craig", distance="cosine")
