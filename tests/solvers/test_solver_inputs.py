"""Bad inputs raise clear ValueErrors; property tests on random instances (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsel.solvers import (
    facility_location,
    greats_greedy,
    matroid_matching_pursuit,
    omp,
    omp_kernel,
    similarity_from_distance,
)

SIM = torch.rand(6, 6)
G = torch.randn(6, 4)
T = torch.randn(4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: facility_location(SIM, 0), "k must be positive"),
        (lambda: facility_location(SIM, 7), "k=7 is larger"),
        (lambda: facility_location(SIM, 2.5), "k must be a positive integer"),
        (lambda: facility_location(torch.rand(6, 5), 2), "similarity must be square"),
        (lambda: facility_location(torch.rand(6), 2), "similarity must be 2-D"),
        (lambda: facility_location(SIM, 2, method="fast"), "method must be"),
        (lambda: facility_location(SIM, 2, budgets=[1, 1]), "budgets were given without groups"),
        (lambda: facility_location(SIM, 4, groups=[0, 0, 0, 1, 1, 1], budgets=[1, 2]), "allow only 3 picks"),
        (lambda: facility_location(SIM, 2, groups=[0, 0, 0, 1, 1, 2], budgets=[1, 2]), "groups holds id 2"),
        (lambda: facility_location(SIM, 2, groups=[0, 0, 1], budgets=[1, 2]), "groups has 3 entries"),
        (lambda: facility_location(SIM, 2, groups=[0, 0, 0, 1, 1, 1], budgets=[-1, 3]), "non-negative"),
        (lambda: facility_location(SIM, 2, method="stochastic", epsilon=0.0), "epsilon"),
        (lambda: similarity_from_distance(-SIM), "dist must be non-negative"),
        (lambda: omp(G, T, 0), "k must be positive"),
        (lambda: omp(G, torch.randn(5), 2), "target has 5 entries"),
        (lambda: omp(G, T, 2, ridge=-1.0), "ridge"),
        (lambda: omp(G, T, 2, tol=math.nan), "tol"),
        (lambda: omp(G, torch.full((4,), math.inf), 2), "target contains NaN or inf"),
        (lambda: omp_kernel(torch.rand(6, 5), torch.rand(6), 1.0, 2), "gram must be square"),
        (lambda: omp_kernel(SIM, torch.rand(5), 1.0, 2), "mu has 5 entries"),
        (lambda: omp_kernel(SIM, torch.rand(6), -1.0, 2), "target_sqnorm"),
        (lambda: matroid_matching_pursuit(torch.rand(5), SIM, 2), "scores has 5 entries"),
        (lambda: greats_greedy(torch.rand(6), SIM, 2, lr=0.0), "lr must be"),
        (lambda: greats_greedy(torch.rand(6), SIM, 9), "k=9 is larger"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_finite_rows_are_named():
    sim = torch.rand(5, 5)
    sim[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"similarity contains NaN or inf \(rows \[3\]\)"):
        facility_location(sim, 2)
    feats = torch.randn(5, 3)
    feats[2, 0] = math.inf
    with pytest.raises(ValueError, match=r"features contains NaN or inf \(rows \[2\]\)"):
        omp(feats, torch.randn(3), 2)


@st.composite
def instances(draw):
    n = draw(st.integers(3, 16))
    d = draw(st.integers(1, 10))
    num_groups = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    sizes = torch.bincount(groups, minlength=num_groups)
    budgets = torch.tensor([draw(st.integers(0, int(s))) for s in sizes])
    capacity = int(budgets.sum())
    if capacity == 0:
        budgets = sizes.clone()
        capacity = n
    k = draw(st.integers(1, capacity))
    feats = torch.randn(n, d, generator=g, dtype=torch.float64)
    target = torch.randn(d, generator=g, dtype=torch.float64)
    return feats, target, groups, budgets, k


def check_selection(sel, n, k, groups, budgets, *, exact_k):
    idx = sel.indices
    assert idx.numel() == k if exact_k else idx.numel() <= k
    assert idx.unique().numel() == idx.numel()
    assert bool(((idx >= 0) & (idx < n)).all())
    counts = torch.bincount(groups[idx], minlength=budgets.numel())
    assert bool((counts <= budgets).all())
    assert bool(torch.isfinite(sel.weights).all())


@settings(max_examples=25, deadline=None)
@given(instances(), st.sampled_from(["naive", "lazy", "stochastic"]))
def test_facility_location_properties(inst, method):
    feats, _, groups, budgets, k = inst
    sim = -torch.cdist(feats, feats)
    sel = facility_location(sim, k, groups=groups, budgets=budgets, method=method)
    check_selection(sel, feats.shape[0], k, groups, budgets, exact_k=True)
    assert float(sel.weights.sum()) == feats.shape[0]
    assert bool((sel.gains >= 0).all())


@settings(max_examples=25, deadline=None)
@given(instances(), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.5]))
def test_omp_properties(inst, nonnegative, fill, ridge):
    feats, target, groups, budgets, k = inst
    sel = omp(feats, target, k, groups=groups, budgets=budgets, nonnegative=nonnegative, fill=fill, ridge=ridge)
    check_selection(sel, feats.shape[0], k, groups, budgets, exact_k=False)
    if nonnegative:
        assert bool((sel.weights >= 0).all())
    assert 0.0 <= sel.residual <= 1.0 + 1e-9
    kern = omp_kernel(
        feats @ feats.T,
        feats @ target,
        float(target @ target),
        k,
        groups=groups,
        budgets=budgets,
        nonnegative=nonnegative,
        fill=fill,
        ridge=ridge,
    )
    # the fitted picks agree; zero-weight fill picks rank round-off-level correlations, so may not
    fitted = len(sel) - sel.info["filled"]
    assert kern.indices[:fitted].tolist() == sel.indices[:fitted].tolist()


@settings(max_examples=25, deadline=None)
@given(instances(), st.booleans())
def test_matroid_pursuit_and_greats_properties(inst, randomized):
    feats, target, groups, budgets, k = inst
    gram = feats @ feats.T + 1e-3 * torch.eye(feats.shape[0], dtype=feats.dtype)
    sel = matroid_matching_pursuit(feats @ target, gram, k, groups=groups, budgets=budgets, randomized=randomized)
    check_selection(sel, feats.shape[0], k, groups, budgets, exact_k=True)
    assert bool((sel.weights >= 0).all())
    gr = greats_greedy(feats @ target, gram, k, lr=0.1, groups=groups, budgets=budgets)
    check_selection(gr, feats.shape[0], k, groups, budgets, exact_k=True)
