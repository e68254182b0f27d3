"""Facility location: golden values, brute-force guarantees, naive == lazy ranking."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mixsel.solvers import facility_location, pairwise_l1, similarity_from_distance
from mixsel.solvers.facility_location import EXACT_OPTIMIZERS, OPTIMIZERS

# Five points on a line, x = [0, 1, 2, 10, 11]; sim = max(D) - D with D the L1 distance.
# Hand computation (see the comments of test_golden_ranking): picks 2, 3, 0 with gains 35, 16, 2.
LINE = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])


def line_similarity() -> torch.Tensor:
    return similarity_from_distance(pairwise_l1(LINE))


def objective(sim: torch.Tensor, subset) -> float:
    """F(S) = sum_i max_{s in S} sim'[i, s] with sim' shifted to be non-negative (oracle)."""
    arr = sim.double().numpy()
    shifted = arr - min(0.0, float(arr.min()))
    return float(shifted[:, list(subset)].max(axis=1).sum()) if subset else 0.0


def python_greedy(sim: torch.Tensor, k: int, groups=None, budgets=None) -> list[int]:
    """Independent oracle: textbook greedy in numpy, ties to the lowest index."""
    arr = sim.double().numpy()
    shifted = arr - min(0.0, float(arr.min()))
    cur = np.zeros(arr.shape[0])
    chosen: list[int] = []
    count = {}
    for _ in range(k):
        best, best_gain = None, -math.inf
        for j in range(sim.shape[0]):
            if j in chosen:
                continue
            if groups is not None and count.get(int(groups[j]), 0) >= int(budgets[int(groups[j])]):
                continue
            gain = float(np.maximum(shifted[:, j] - cur, 0.0).sum())
            if gain > best_gain:
                best, best_gain = j, gain
        chosen.append(best)
        cur = np.maximum(cur, shifted[:, best])
        if groups is not None:
            count[int(groups[best])] = count.get(int(groups[best]), 0) + 1
    return chosen


def test_pairwise_l1_matches_definition():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 4.0, 1.0], [4.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    torch.testing.assert_close(pairwise_l1(x), expected)
    torch.testing.assert_close(pairwise_l1(x, chunk_size=1), expected)
    torch.testing.assert_close(similarity_from_distance(expected), 4.0 - expected)


@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_golden_ranking(method):
    # First gains are the column sums 31, 34, 35, 27, 24 -> pick 2 (35). cur = [9,10,11,3,2];
    # gains then: col0 2, col1 2, col3 8+8=16, col4 7+9=16 -> tie, lowest index 3 (16).
    # cur = [9,10,11,11,10]; gains col0 2, col1 1+1=2, col4 1 -> tie, pick 0 (2).
    sel = facility_location(line_similarity(), 3, method=method)
    assert sel.indices.tolist() == [2, 3, 0]
    assert sel.gains.tolist() == [35.0, 16.0, 2.0]
    # rows 1 (tie between medoids 2 and 0: earliest pick wins) and 2 -> medoid 2; rows 3, 4 -> 3; row 0 -> 0
    assert sel.weights.tolist() == [2.0, 2.0, 1.0]
    assert sel.info["objective"] == 53.0


def test_golden_with_budgets_and_negative_similarities():
    # -D equals (max D - D) after the shift by min(sim) = -11, so the same gains apply;
    # group 0 = {0, 1, 2} has budget 1, so after 2 and 3 the only choice left is 4 (gain 1).
    sim = -pairwise_l1(LINE)
    sel = facility_location(sim, 3, groups=[0, 0, 0, 1, 1], budgets=[1, 2])
    assert sel.indices.tolist() == [2, 3, 4]
    assert sel.gains.tolist() == [35.0, 16.0, 1.0]
    assert sel.info["shift"] == -11.0


def random_similarity(seed: int, n: int, integer: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if integer:  # many exact ties: exercises the lowest-index tie-breaking
        return torch.randint(0, 4, (n, n), generator=g).to(torch.float32)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return -torch.cdist(x, x)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_beats_one_minus_one_over_e_of_brute_force(seed):
    n, k = 10, 3
    sim = random_similarity(seed, n, integer=seed % 2 == 0)
    opt = max(objective(sim, s) for s in itertools.combinations(range(n), k))
    for method in ("naive", "lazy"):
        sel = facility_location(sim, k, method=method)
        value = objective(sim, sel.indices.tolist())
        assert value >= (1 - 1 / math.e) * opt - 1e-5
        assert sel.info["objective"] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_half_approximation_under_partition_matroid(seed):
    n, k = 11, 4
    sim = random_similarity(100 + seed, n, integer=False)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    budgets = torch.tensor([1, 2, 2])
    feasible = [
        s
        for s in itertools.combinations(range(n), k)
        if all(int((groups[list(s)] == g).sum()) <= int(budgets[g]) for g in range(3))
    ]
    opt = max(objective(sim, s) for s in feasible)
    sel = facility_location(sim, k, groups=groups, budgets=budgets)
    assert objective(sim, sel.indices.tolist()) >= 0.5 * opt - 1e-5
    assert sel.indices.tolist() == python_greedy(sim, k, groups, budgets)


@pytest.mark.parametrize("seed", range(8))
def test_naive_lazy_and_oracle_give_the_same_ranking(seed):
    n = 12
    sim = random_similarity(200 + seed, n, integer=seed % 2 == 0)
    naive = facility_location(sim, n, method="naive")
    lazy = facility_location(sim, n, method="lazy", lazy_batch=1)
    lazy_big = facility_location(sim, n, method="lazy", lazy_batch=5, chunk_size=2)
    assert naive.indices.tolist() == lazy.indices.tolist() == lazy_big.indices.tolist()
    assert torch.equal(naive.gains, lazy.gains)
    assert naive.indices.tolist() == python_greedy(sim, n)


def test_naive_and_lazy_agree_on_a_larger_instance():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    sim = similarity_from_distance(pairwise_l1(x))
    naive = facility_location(sim, 60, method="naive", chunk_size=37)
    lazy = facility_location(sim, 60, method="lazy")
    assert torch.equal(naive.indices, lazy.indices)
    assert lazy.info["evaluations"] < naive.info["evaluations"]
    assert float(naive.weights.sum()) == 300.0


def test_asymmetric_similarity_uses_columns_as_candidates():
    # sim[i, s]: point i covered by candidate s. Column 1 covers every point well.
    sim = torch.tensor([[1.0, 5.0, 0.0], [0.0, 5.0, 1.0], [2.0, 5.0, 0.0]])
    for method in ("naive", "lazy"):
        sel = facility_location(sim, 1, method=method)
        assert sel.indices.tolist() == [1]
        assert sel.gains.tolist() == [15.0]
        assert sel.weights.tolist() == [3.0]


def test_stochastic_is_seeded_and_close_to_greedy():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(5))
    sim = similarity_from_distance(pairwise_l1(x))
    a = facility_location(sim, 20, method="stochastic", generator=torch.Generator().manual_seed(1))
    b = facility_location(sim, 20, method="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.indices, b.indices)
    greedy = facility_location(sim, 20)
    assert a.info["objective"] >= (1 - 1 / math.e - 0.1) * greedy.info["objective"]
    assert a.indices.unique().numel() == 20


@pytest.mark.parametrize("method", EXACT_OPTIMIZERS)
@pytest.mark.parametrize("seed", range(6))
def test_every_exact_optimiser_gives_the_naive_ranking(method, seed):
    # theory: lazy greedy only skips evaluations whose stale upper bound cannot win, so every
    # exact optimiser returns naive greedy's ranking and gains, with and without budgets
    n = 24
    sim = random_similarity(300 + seed, n, integer=seed % 2 == 0)
    groups = torch.arange(n) % 3
    for kwargs in ({}, {"groups": groups, "budgets": [3, 2, 4]}):
        k = 9 if kwargs else n
        naive = facility_location(sim, k, method="naive", **kwargs)
        other = facility_location(sim, k, method=method, lazy_batch=1 + seed, **kwargs)
        assert other.indices.tolist() == naive.indices.tolist()
        assert torch.equal(other.gains, naive.gains)
        assert torch.equal(other.weights, naive.weights)


def test_optimiser_table_matches_the_method_names():
    assert set(OPTIMIZERS) == {"naive", "lazy", "stochastic"}
    assert set(EXACT_OPTIMIZERS) <= set(OPTIMIZERS)
