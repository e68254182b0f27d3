import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool
from mixsel.selection.colm import kmeans, small_source_mask

SIZES = torch.tensor([80, 60, 20])  # dataset-level source sizes: source 2 is small (20 < 160 / 3)


def _clustered_pool(step=0, sizes=SIZES):
    """Source 0: 8 examples in 3 clusters (sizes 4, 2, 2); source 1: 6 in 3 clusters of 2; source 2: 2."""
    centres = torch.eye(6, dtype=torch.float64) * 10.0
    rows, domains = [], []
    jitter = [0.0, 0.1, 0.2, 0.3]
    for c, size in ((0, 4), (1, 2), (2, 2)):
        rows += [centres[c] + jitter[j] for j in range(size)]
        domains += [0] * size
    for c in (3, 4, 5):
        rows += [centres[c] + jitter[j] for j in range(2)]
        domains += [1] * 2
    rows += [torch.full((6,), -5.0, dtype=torch.float64), torch.full((6,), 5.0, dtype=torch.float64)]
    domains += [2, 2]
    feats = torch.stack(rows)
    return Pool(
        domains=torch.tensor(domains), num_domains=3, features={"zo_grads": feats}, step=step, source_sizes=sizes
    )


def _cluster_id(i):
    return [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7][i]


def test_small_source_rules():
    assert small_source_mask(torch.tensor([8, 6, 2])).tolist() == [False, False, True]
    # |pool|/Q = 12/4 = 3 counts the absent source; the average over present sources is 4
    assert small_source_mask(torch.tensor([5, 4, 3, 0])).tolist() == [False, False, False, False]
    assert small_source_mask(torch.tensor([5, 4, 3, 0]), rule="average").tolist() == [False, False, True, False]
    # |pool| / c = 12 / 2.5 = 4.8
    assert small_source_mask(torch.tensor([5, 4, 3, 0]), c=2.5).tolist() == [False, True, True, False]
    # small sources {1, 2} hold 5 > k=4: the larger one (1) is demoted to big
    assert small_source_mask(torch.tensor([10, 3, 2]), max_keep=4).tolist() == [False, False, True]
    # dataset sizes [100, 30, 20] (|V|/c = 50): sources 1 and 2 are small; their pool counts [4, 3]
    # exceed k=5, so the one larger *in the dataset* (1) is demoted, whatever the pool holds
    sizes, pool_counts = torch.tensor([100, 30, 20]), torch.tensor([1, 4, 3])
    assert small_source_mask(sizes, max_keep=5, pool_counts=pool_counts).tolist() == [False, False, True]


def test_small_sources_are_decided_from_the_dataset_not_the_pool():
    # the pool holds 8, 6, 2 examples, but in the dataset source 1 is the small one (10 < 150 / 3)
    pool = _clustered_pool(sizes=torch.tensor([80, 10, 60]))
    sel = get_selector("colm", adam=False, sparsify="none").select(pool, 8)
    assert sel.info["small_sources"] == [1]
    assert sorted(sel.indices[:6].tolist()) == [8, 9, 10, 11, 12, 13]
    # per pool (the old rule): source 2 holds 2 < 16 / 3 pool examples
    per_pool = get_selector("colm", adam=False, sparsify="none", small_from="pool").select(pool, 8)
    assert per_pool.info["small_sources"] == [2]
    # "average": below the mean dataset size (110 / 3 = 36.7): sources 1 and 2, holding 8 <= k
    pool = _clustered_pool(sizes=torch.tensor([80, 10, 20]))
    avg = get_selector("colm", adam=False, sparsify="none", small_rule="average").select(pool, 8)
    assert avg.info["small_sources"] == [1, 2]
    with pytest.raises(ValueError, match="source_sizes"):
        get_selector("colm").select(_clustered_pool(sizes=None), 8)
    assert get_selector("colm").needs_source_sizes
    assert not get_selector("colm", small_from="pool").needs_source_sizes
    assert not get_selector("colm", small_sources=[2]).needs_source_sizes


def test_kmeans_pseudo_sources_for_unlabelled_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(6, 3, generator=gen) * 0.01 + 5, torch.randn(4, 3, generator=gen) * 0.01 - 5])
    assign = kmeans(x, 2, generator=torch.Generator().manual_seed(1))
    assert len(set(assign[:6].tolist())) == 1 and len(set(assign[6:].tolist())) == 1
    assert assign[0] != assign[6]
    assert torch.equal(assign, kmeans(x, 2, generator=torch.Generator().manual_seed(1)))
    # clusters of the hidden states replace the (here meaningless) labels: 12 + 4 examples, c = 2
    hidden = torch.cat([torch.full((12, 2), 3.0), torch.full((4, 2), -3.0)]) + torch.randn(16, 2, generator=gen) * 0.01
    feats = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    pool = Pool(
        domains=torch.zeros(16, dtype=torch.long), num_domains=1, features={"zo_grads": feats, "hidden": hidden}
    )
    colm = get_selector("colm", sources="kmeans", clusters=2)
    assert colm.requires == {"zo_grads", "hidden"} and not colm.needs_source_sizes
    sel = colm.select(pool, 6)
    clusters = torch.tensor(sel.info["clusters"])
    small = clusters[12]  # the 4-example cluster is small (4 < 16 / 2) and kept whole
    assert sel.info["small_sources"] == [int(small)]
    assert sorted(sel.indices[:4].tolist()) == [12, 13, 14, 15]
    assert len(set(sel.indices.tolist())) == 6
    with pytest.raises(ValueError, match="clusters"):
        get_selector("colm", sources="kmeans", clusters=0)


def test_keeps_small_source_and_picks_one_medoid_per_cluster():
    pool = _clustered_pool()
    sel = get_selector("colm", adam=False, sparsify="none").select(pool, 8)
    idx = sel.indices.tolist()
    assert idx[:2] == [14, 15]  # the small source (2 < 16/3) is kept whole, first
    assert sel.info["budgets"] == [3, 3, 0]  # 6 remaining picks ~ [8, 6] big-source counts
    assert sorted(_cluster_id(i) for i in idx[2:]) == [0, 1, 2, 3, 4, 5]
    assert idx[2] in (0, 1, 2, 3)  # largest cluster's medoid first
    # natural weights: 1 for the kept examples, cluster sizes for the medoids (the loss ignores them
    # unless selection.use_weights=true; CoLM trains unweighted)
    assert sel.weights.tolist() == [1.0, 1.0, 4.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert len(set(idx)) == 8


def test_weighted_medoids_and_joint_mode():
    pool = _clustered_pool()
    sel = get_selector("colm", adam=False, sparsify="none").select(pool, 5)
    # kept: 2 small; 3 picks, quotas 3 * [8, 6] / 14 = [1.7, 1.3] -> floors [1, 1], the spare unit to
    # the smallest floor with the lowest id -> [2, 1]; weights = cluster sizes inside each source
    assert sel.info["budgets"] == [2, 1, 0]
    assert sel.weights[:2].tolist() == [1.0, 1.0]
    assert float(sel.weights[2:4].sum()) == 8.0 and float(sel.weights[4]) == 6.0
    joint = get_selector("colm", adam=False, sparsify="none", per_source=False).select(pool, 8)
    assert joint.info["budgets"] == [6]
    assert sorted(_cluster_id(i) for i in joint.indices[2:].tolist()) == [0, 1, 2, 3, 4, 5]


def test_keep_small_off_and_explicit_sources():
    pool = _clustered_pool()
    sel = get_selector("colm", adam=False, sparsify="none", keep_small=False).select(pool, 3)
    assert sel.info["small_sources"] == []
    # quotas 3 * [8, 6, 2] / 16 = [1.5, 1.1, 0.4] -> floors [1, 1, 0]; the spare unit to the smallest floor
    assert torch.bincount(pool.domains[sel.indices], minlength=3).tolist() == [1, 1, 1]
    sel = get_selector("colm", adam=False, small_sources=[1]).select(pool, 8)
    assert sorted(sel.indices[:6].tolist()) == [8, 9, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="more than the batch"):
        get_selector("colm", small_sources=[0, 1]).select(pool, 8)


def test_adam_state_round_trip_and_determinism():
    a = get_selector("colm", h=3)
    first = a.select(_clustered_pool(step=0), 8)
    assert a.normalizer.step == 1
    state = a.state_dict()
    b = get_selector("colm", h=3)
    b.load_state_dict(state)
    sa, sb = a.select(_clustered_pool(step=1), 8), b.select(_clustered_pool(step=1), 8)
    assert torch.equal(sa.indices, sb.indices)
    torch.testing.assert_close(a.normalizer.m, b.normalizer.m)
    # the moments fold in the mean of the *selected big-source* raw features only
    raw = _clustered_pool().features["zo_grads"]
    big = first.indices[2:]
    torch.testing.assert_close(state["normalizer"]["m"], 0.1 * raw[big].mean(0))
    again = get_selector("colm", h=3).select(_clustered_pool(step=0), 8)
    assert torch.equal(first.indices, again.indices)
    with pytest.raises(ValueError, match="normalizer"):
        b.load_state_dict({})


def test_random_sparsification_and_cosine_run_and_respect_budgets():
    pool = _clustered_pool()
    for opts in ({"sparsify": "random", "h": 2}, {"distance": "cosine"}, {"feature": "grads"}):
        if opts.get("feature") == "grads":
            pool.features["grads"] = pool.features["zo_grads"]
        sel = get_selector("colm", **opts).select(pool, 8)
        assert len(set(sel.indices.tolist())) == 8
        assert torch.bincount(pool.domains[sel.indices], minlength=3).tolist() == [3, 3, 2]


def test_bad_options():
    bad_options = (
        {"feature": "hidden"},
        {"sparsify": "weight"},
        {"distance": "l2"},
        {"small_rule": "x"},
        {"h": 0},
        {"small_from": "batch"},
        {"sources": "topics"},
        {"rounding": "up"},
    )
    for bad in bad_options:
        with pytest.raises(ValueError):
            get_selector("colm", **bad)
