"""OMP: hand-computed golden run, float64 LS / NNLS oracles, kernel == feature form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from mixsel.solvers import omp, omp_kernel


def test_golden_signed_run_stops_at_zero_residual():
    # t = (3, 2, 0.5). Correlations <g, t>: 3, 2, 0.5, 5 -> pick 3 = (1,1,0), w = 5/2, r = (.5,-.5,.5);
    # correlations 0.5, -0.5, 0.5 -> tie 0/2, lowest index 0; support {3, 0}: w3 = 2, w0 = 1,
    # r = (0, 0, .5); then 2 with w = .5 and r = 0 -> stop by tolerance before the 4th pick.
    G = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float64)
    t = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    for nonnegative in (True, False):
        sel = omp(G, t, 4, nonnegative=nonnegative)
        assert sel.indices.tolist() == [3, 0, 2]
        torch.testing.assert_close(sel.weights, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        torch.testing.assert_close(sel.gains, torch.tensor([12.5, 0.5, 0.25], dtype=torch.float64))
        hist = sel.info["residual_history"]
        assert hist[:3] == pytest.approx([1.0, math.sqrt(0.75 / 13.25), math.sqrt(0.25 / 13.25)])
        assert hist[3] == pytest.approx(0.0, abs=1e-7)
        assert sel.info["stop_reason"] == "tolerance"
        assert sel.residual == pytest.approx(0.0, abs=1e-7)


def test_nonnegative_stops_without_positive_correlation_and_fill():
    G = torch.eye(3, dtype=torch.float64)
    t = torch.tensor([-1.0, -2.0, 0.5], dtype=torch.float64)
    sel = omp(G, t, 3)
    assert sel.indices.tolist() == [2]
    assert sel.info["stop_reason"] == "no positive correlation"
    filled = omp(G, t, 3, fill=True)
    # after fitting e2 the correlations are -1, -2, 0: fill by largest correlation, weight 0
    assert filled.indices.tolist() == [2, 0, 1]
    assert filled.weights.tolist() == [0.5, 0.0, 0.0]
    assert filled.info["filled"] == 2
    signed = omp(G, t, 3, nonnegative=False)
    assert signed.indices.tolist() == [1, 0, 2]
    assert signed.weights.tolist() == [-2.0, -1.0, 0.5]


def test_zero_target_warns_and_returns_empty():
    G = torch.randn(5, 3)
    with pytest.warns(RuntimeWarning, match="target is zero"):
        sel = omp(G, torch.zeros(3), 2)
    assert len(sel) == 0 and sel.residual == 0.0
    with pytest.warns(RuntimeWarning):
        sel = omp(G, torch.zeros(3), 2, fill=True, groups=[0, 0, 1, 1, 1], budgets=[1, 1])
    assert sel.indices.tolist() == [0, 2] and sel.weights.tolist() == [0.0, 0.0]


def problem(seed: int, n: int = 60, d: int = 25, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=dtype)
    t = G[:10].sum(0) - 0.5 * G[10:15].sum(0) + 0.3 * torch.randn(d, generator=g, dtype=dtype)
    return G, t


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_nonnegative_weights_equal_scipy_nnls_on_the_support(seed, ridge):
    G, t = problem(seed)
    sel = omp(G, t, 20, ridge=ridge)
    S = sel.indices.numpy()
    A = G[S].T.numpy()
    b = t.numpy()
    if ridge:  # ||A w - b||^2 + ridge ||w||^2 as one stacked least-squares problem
        A = np.vstack([A, math.sqrt(ridge) * np.eye(len(S))])
        b = np.concatenate([b, np.zeros(len(S))])
    w, _rnorm = nnls(A, b)
    np.testing.assert_allclose(sel.weights.numpy(), w, atol=1e-9)
    assert (sel.weights >= 0).all()
    fit = float(np.sum((G[S].T.numpy() @ w - t.numpy()) ** 2))
    assert sel.residual == pytest.approx(math.sqrt(fit / float(t @ t)), rel=1e-7)


def test_nnls_active_set_path_is_exercised():
    # Strongly correlated features force weights of earlier picks to zero (Lawson-Hanson drops).
    exercised = 0
    for seed in range(5):
        G, t = problem(seed, n=40, d=8)
        sel = omp(G, t, 8)
        exercised += sel.info["nnls_refactorizations"]
        S = sel.indices.numpy()
        w, _ = nnls(G[S].T.numpy(), t.numpy())
        np.testing.assert_allclose(sel.weights.numpy(), w, atol=1e-9)
    assert exercised > 0


@pytest.mark.parametrize("seed", range(4))
def test_signed_weights_equal_float64_least_squares(seed):
    G, t = problem(seed)
    sel = omp(G.float(), t.float(), 15, nonnegative=False)
    S = sel.indices.numpy()
    w = np.linalg.lstsq(G[S].T.numpy(), t.numpy(), rcond=None)[0]
    np.testing.assert_allclose(sel.weights.double().numpy(), w, rtol=1e-3, atol=1e-4)
    # residual history is non-increasing for least squares on nested supports
    hist = sel.info["residual_history"]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(hist))


@pytest.mark.parametrize("nonnegative", [True, False])
def test_kernel_form_equals_feature_form(nonnegative):
    G, t = problem(11, n=80, d=30)
    groups = torch.arange(80) % 3
    kw = dict(groups=groups, budgets=[3, 5, 9], nonnegative=nonnegative, ridge=0.1)
    a = omp(G, t, 12, **kw)
    b = omp_kernel(G @ G.T, G @ t, float(t @ t), 12, **kw)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    assert a.residual == pytest.approx(b.residual, rel=1e-9)


def test_budgets_are_never_exceeded():
    G, t = problem(3, n=90, d=40)
    groups = torch.arange(90) // 30
    sel = omp(G, t, 10, groups=groups, budgets=[1, 6, 3])
    counts = torch.bincount(groups[sel.indices], minlength=3)
    assert (counts <= torch.tensor([1, 6, 3])).all()
    assert sel.indices.unique().numel() == len(sel)


def test_matches_scikit_learn_signed_omp():
    sklearn_omp = pytest.importorskip("sklearn.linear_model").OrthogonalMatchingPursuit
    G, t = problem(7, n=50, d=40)
    ref = sklearn_omp(n_nonzero_coefs=12, fit_intercept=False).fit(G.T.numpy(), t.numpy())
    sel = omp(G, t, 12, nonnegative=False)
    assert sorted(sel.indices.tolist()) == np.flatnonzero(ref.coef_).tolist()
    np.testing.assert_allclose(ref.coef_[sel.indices.numpy()], sel.weights.numpy(), atol=1e-8)
