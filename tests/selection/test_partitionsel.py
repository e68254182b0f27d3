import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool
from mixsel.solvers import matroid_matching_pursuit

V = torch.tensor([1.0, 1.0], dtype=torch.float64)
# domain 0: a=(1,0), b=(0,.7); domain 1: c=(.95,0) (redundant with a), e=(0,.8) (complements a)
G = torch.tensor([[1.0, 0.0], [0.0, 0.7], [0.95, 0.0], [0.0, 0.8]], dtype=torch.float64)
DOMAINS = torch.tensor([0, 0, 1, 1])


def _pool(g=G, v=V, domains=DOMAINS, lr=1e-3, step=0, **kw):
    v = v if v.dim() == 2 else v[None]
    feats = {"gram": g @ g.T, "val_scores": g @ v.T}
    return Pool(domains=domains, num_domains=int(domains.max()) + 1, features=feats, lr=lr, step=step, **kw)


def _random_pool(n=24, d=6, domains=3, seed=0, step=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, d, generator=gen, dtype=torch.float64)
    dom = torch.randint(domains, (n,), generator=gen)
    return _pool(g, v, dom, lr=3e-3, step=step)


def test_first_pick_is_the_validation_aligned_example_and_cross_domain_redundancy_is_avoided():
    sel = get_selector("partitionsel").select(_pool(), 2)
    # s = <g_i, v> = [1, .7, .95, .8]: a first; then c's residual correlation is .95 - .95 * 1 = 0
    # while e keeps .8, so the second (domain-1) pick is the complementary e
    assert sel.indices.tolist() == [0, 3]
    assert sel.info["budgets"] == [1, 1]
    assert sel.weights.shape == (2,) and bool((sel.weights > 0).all())  # the NNLS weights w
    # the independent per-domain baseline cannot see a and picks the redundant c
    assert get_selector("per_domain").select(_pool(), 2).indices.tolist() == [0, 2]


def test_omp_weights_and_scaled_utility_match_the_papers_form():
    pool = _random_pool()
    eta = pool.lr
    sel = get_selector("partitionsel").select(pool, 8)  # Selection.weights = the NNLS weights w
    # oracle: the solver on the paper's inputs s' = eta s + eta^2/2 diag K and K' = eta^2 K
    gram, s = pool.features["gram"], pool.features["val_scores"].mean(1)
    ref = matroid_matching_pursuit(
        eta * s + 0.5 * eta**2 * torch.diagonal(gram),
        eta**2 * gram,
        8,
        groups=pool.domains,
        budgets=torch.tensor(sel.info["budgets"]),
    )
    assert sel.indices.tolist() == ref.indices.tolist()
    torch.testing.assert_close(sel.weights.to(torch.float64), ref.weights, rtol=1e-4, atol=0)
    assert sel.info["utility"] == pytest.approx(ref.info["utility"], rel=1e-6)


def test_budgets_filled_exactly_unique_and_deterministic():
    for policy, kw in (("proportional", {}), ("minimum", {"minimum": 2}), ("fixed", {"shares": [1, 0, 1]})):
        pool = _random_pool()
        sel = get_selector("partitionsel", budget=policy, **kw).select(pool, 9)
        counts = torch.bincount(pool.domains[sel.indices], minlength=3)
        assert counts.tolist() == sel.info["budgets"]
        assert len(set(sel.indices.tolist())) == 9
        again = get_selector("partitionsel", budget=policy, **kw).select(_random_pool(), 9)
        assert torch.equal(sel.indices, again.indices)
    pool = _random_pool()
    pool.domain_weights = torch.tensor([0.5, 0.5, 0.0])
    sel = get_selector("partitionsel", budget="weights").select(pool, 6)
    assert torch.bincount(pool.domains[sel.indices], minlength=3).tolist()[2] == 0


def test_randomized_shortlist_is_seeded_by_the_pool():
    a = get_selector("partitionsel", randomized=True).select(_random_pool(step=3), 8)
    b = get_selector("partitionsel", randomized=True).select(_random_pool(step=3), 8)
    assert torch.equal(a.indices, b.indices)
    counts = torch.bincount(_random_pool().domains[a.indices], minlength=3)
    assert counts.tolist() == a.info["budgets"]


def test_per_domain_equals_partitionsel_run_on_each_domain_alone():
    pool = _random_pool(n=30)
    k = 10
    sel = get_selector("per_domain").select(pool, k)
    budgets = sel.info["budgets"]
    for d in range(3):
        members = torch.nonzero(pool.domains == d).flatten()
        if budgets[d] == 0:
            continue
        sub = Pool(
            domains=torch.zeros(members.numel(), dtype=torch.long),
            num_domains=1,
            features={
                "gram": pool.features["gram"][members][:, members],
                "val_scores": pool.features["val_scores"][members],
            },
            lr=pool.lr,
        )
        alone = get_selector("partitionsel").select(sub, budgets[d])
        mine = [i for i in sel.indices.tolist() if int(pool.domains[i]) == d]
        assert mine == members[alone.indices].tolist()


def test_balanced_anchors_need_anchor_domains():
    pool = _random_pool()
    with pytest.raises(ValueError, match="val_domains"):
        get_selector("partitionsel", anchors="balanced").select(pool, 4)
    pool.val_domains = torch.tensor([0, 0])  # both anchors from one domain: balanced == mean
    a = get_selector("partitionsel", anchors="balanced").select(pool, 4)
    b = get_selector("partitionsel").select(pool, 4)
    assert torch.equal(a.indices, b.indices)


def test_bad_options():
    with pytest.raises(ValueError, match="budget"):
        get_selector("partitionsel", budget="nope")
    with pytest.raises(ValueError, match="anchors"):
        get_selector("partitionsel", anchors="median")
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        get_selector("partitionsel").select(_pool(), 5)
