"""PartitionSel's matroid matching pursuit and the GREATS greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from mixsel.solvers import greats_greedy, matroid_matching_pursuit, omp_kernel


def instance(seed: int, n: int = 30, d: int = 40):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = G[:6].mean(0) + 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    return G, v


def max_utility_on(scores: torch.Tensor, gram: torch.Tensor, support: list[int]) -> tuple[np.ndarray, float]:
    """Oracle: max_{w >= 0} <w, s> - 1/2 w^T K w via scipy NNLS on K = R^T R (R upper Cholesky)."""
    K = gram[support][:, support].numpy()
    s = scores[support].numpy()
    R = np.linalg.cholesky(K).T
    w, _ = nnls(R, np.linalg.solve(R.T, s))
    return w, float(w @ s - 0.5 * w @ K @ w)


@pytest.mark.parametrize("randomized", [False, True])
def test_weights_are_the_exact_nnls_refit_and_budgets_are_filled(randomized):
    G, v = instance(0)
    groups = torch.arange(30) % 3
    scores, gram = G @ v, G @ G.T
    sel = matroid_matching_pursuit(
        scores,
        gram,
        9,
        groups=groups,
        budgets=[2, 3, 4],
        randomized=randomized,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.bincount(groups[sel.indices], minlength=3).tolist() == [2, 3, 4]
    w, utility = max_utility_on(scores, gram, sel.indices.tolist())
    np.testing.assert_allclose(sel.weights.numpy(), w, atol=1e-8)
    assert sel.info["utility"] == pytest.approx(utility, rel=1e-9)
    assert float(sel.gains.sum()) == pytest.approx(utility, rel=1e-9)


def test_deterministic_variant_equals_nonnegative_omp_while_correlations_stay_positive():
    G, v = instance(1, n=40, d=60)
    groups = torch.arange(40) // 10
    budgets = [2, 2, 2, 2]
    mmp = matroid_matching_pursuit(G @ v, G @ G.T, 8, groups=groups, budgets=budgets)
    ref = omp_kernel(G @ G.T, G @ v, float(v @ v), 8, groups=groups, budgets=budgets, fill=True)
    assert ref.info["filled"] == 0
    assert torch.equal(mmp.indices, ref.indices)
    torch.testing.assert_close(mmp.weights, ref.weights)


def test_always_fills_even_with_negative_scores():
    scores = torch.tensor([-1.0, -2.0, 0.5, -0.1])
    sel = matroid_matching_pursuit(scores, torch.eye(4), 3)
    # proxies: 0.5 first (weight 0.5), then -0.1 and -1 stay at weight 0
    assert sel.indices.tolist() == [2, 3, 0]
    assert sel.weights.tolist() == [0.5, 0.0, 0.0]


def test_randomized_is_reproducible_and_picks_from_the_shortlist():
    G, v = instance(2)
    scores, gram = G @ v, G @ G.T
    a = matroid_matching_pursuit(scores, gram, 10, randomized=True, generator=torch.Generator().manual_seed(9))
    b = matroid_matching_pursuit(scores, gram, 10, randomized=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.indices, b.indices)
    # the first pick is among the top-10 scores (the max-weight base of the uniform matroid)
    assert int(a.indices[0]) in torch.topk(scores, 10).indices.tolist()


def greats_oracle(scores, gram, k, lr):
    """Greedy on the explicit utility U(S) = lr sum s_i - lr^2 sum_{i<j} K_ij."""

    def U(S):
        return lr * sum(float(scores[i]) for i in S) - lr**2 * sum(
            float(gram[i, j]) for a, i in enumerate(S) for j in S[a + 1 :]
        )

    chosen: list[int] = []
    for _ in range(k):
        rest = [j for j in range(len(scores)) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (U([*chosen, j]) - U(chosen), -j)))
    return chosen


def test_greats_golden_and_learning_rate_dependence():
    scores = torch.tensor([3.0, 2.5, 2.0])
    gram = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # lr = 1: after item 0, item 1 drops to 2.5 - 0.8 = 1.7 < 2.0 -> order 0, 2, 1
    sel = greats_greedy(scores, gram, 3, lr=1.0)
    assert sel.indices.tolist() == [0, 2, 1]
    assert sel.gains.tolist() == pytest.approx([3.0, 2.0, 1.7])
    # lr = 0.1: 0.25 - 0.01 * 0.8 = 0.242 > 0.2 -> order 0, 1, 2
    assert greats_greedy(scores, gram, 3, lr=0.1).indices.tolist() == [0, 1, 2]
    assert greats_greedy(scores, gram, 2, lr=1.0, groups=[0, 0, 1], budgets=[2, 0]).indices.tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(3))
def test_greats_matches_explicit_utility_greedy(seed):
    G, v = instance(seed, n=12, d=5)
    scores, gram = G @ v, G @ G.T
    sel = greats_greedy(scores, gram, 6, lr=0.3)
    assert sel.indices.tolist() == greats_oracle(scores, gram, 6, 0.3)
    assert sel.weights.tolist() == [1.0] * 6
