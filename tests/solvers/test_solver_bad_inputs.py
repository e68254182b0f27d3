"""Issue 14 for the solvers: every bad input gets one ValueError line naming the argument and the fix.

Table-driven: each row is (case id, call, pattern of the message). Wrong Grams (non-symmetric,
clearly non-PSD), non-integer ``k`` and non-finite inputs, for every solver that takes them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixsel.solvers import facility_location, greats_greedy, matroid_matching_pursuit, omp, omp_kernel

N = 8
_gen = torch.Generator().manual_seed(0)
FEATS = torch.randn(N, 5, generator=_gen, dtype=torch.float64)
GRAM = FEATS @ FEATS.T
SCORES = FEATS @ torch.randn(5, generator=_gen, dtype=torch.float64)
SIM = -torch.cdist(FEATS, FEATS)


def with_entry(m: torch.Tensor, i: int, j: int, value: float) -> torch.Tensor:
    out = m.clone()
    out[i, j] = value
    return out


# wrong Grams, each a typical user mistake
WRONG_GRAMS = {
    "random matrix": (
        torch.rand(N, N, generator=_gen, dtype=torch.float64) + N * torch.eye(N),
        "gram is not symmetric",
    ),
    "cross Gram": (FEATS @ (FEATS + 0.5).T, "gram is not symmetric"),
    "negated Gram": (-GRAM, r"gram\[\d, \d\] = -[\d.]+ < 0.*squared norms"),
    "distance matrix": (torch.cdist(FEATS, FEATS), "gram is not positive semi-definite"),
    "diagonal dropped": (GRAM - torch.diag(torch.diagonal(GRAM)), "gram is not positive semi-definite"),
    "entry beyond Cauchy-Schwarz": (
        with_entry(with_entry(GRAM, 0, 1, 10 * float(GRAM.max())), 1, 0, 10 * float(GRAM.max())),
        "gram is not positive semi-definite",
    ),
    "NaN entry": (with_entry(GRAM, 2, 3, math.nan), r"gram contains NaN or inf \(rows \[2\]\)"),
    "inf entry": (with_entry(GRAM, 5, 5, math.inf), r"gram contains NaN or inf \(rows \[5\]\)"),
}

GRAM_SOLVERS = {
    "greats_greedy": lambda gram: greats_greedy(SCORES, gram, N, lr=0.5),
    "matroid_matching_pursuit": lambda gram: matroid_matching_pursuit(SCORES, gram, N),
    "omp_kernel": lambda gram: omp_kernel(gram, SCORES, 1.0, N, fill=True),
}


@pytest.mark.parametrize("solver", list(GRAM_SOLVERS))
@pytest.mark.parametrize("case", list(WRONG_GRAMS))
def test_wrong_gram_is_one_clear_line(solver, case):
    gram, pattern = WRONG_GRAMS[case]
    with pytest.raises(ValueError, match=pattern) as err:
        GRAM_SOLVERS[solver](gram)
    assert "\n" not in str(err.value)
    assert "pass " in str(err.value) or "repair" in str(err.value)  # the message says what to do


@pytest.mark.parametrize("solver", list(GRAM_SOLVERS))
def test_round_off_and_float32_grams_are_accepted(solver):
    # round-off asymmetry, float32 products and a rank-deficient Gram (zero eigenvalues that
    # round to tiny negative ones) are legitimate inputs
    noisy = GRAM + 1e-9 * torch.randn(N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low_rank = FEATS[:, :2] @ FEATS[:, :2].T
    f32 = FEATS.float() @ FEATS.float().T
    for gram in (noisy, low_rank, f32, torch.zeros(N, N, dtype=torch.float64)):
        sel = GRAM_SOLVERS[solver](gram.to(torch.float64) if solver != "greats_greedy" else gram)
        assert len(sel) <= N


K_CASES = {
    "bool": (True, "k must be a positive integer, got the bool True"),
    "numpy bool": (np.bool_(True), "k must be a positive integer, got the bool"),
    "whole float": (2.0, "k must be a positive integer, got float 2.0; pass a whole number"),
    "fraction": (2.5, "k must be a positive integer, got float 2.5"),
    "numpy float": (np.float64(3.0), "k must be a positive integer, got float64 3.0"),
    "string": ("4", "k must be a positive integer, got str 4"),
    "None": (None, "k must be a positive integer, got NoneType None"),
    "bool tensor": (torch.tensor(True), "k must be a positive integer, got the bool"),
    "float tensor": (torch.tensor(2.0), "k must be a positive integer, got Tensor"),
    "zero": (0, "k must be positive, got k=0"),
    "negative numpy int": (np.int64(-1), "k must be positive, got k=-1"),
    "too large": (N + 1, f"k={N + 1} is larger than the number of candidates n={N}"),
}

K_SOLVERS = {
    "facility_location": lambda k: facility_location(SIM, k),
    "omp": lambda k: omp(FEATS, FEATS[0], k),
    "omp_kernel": lambda k: omp_kernel(GRAM, SCORES, 1.0, k),
    "matroid_matching_pursuit": lambda k: matroid_matching_pursuit(SCORES, GRAM, k),
    "greats_greedy": lambda k: greats_greedy(SCORES, GRAM, k),
}


@pytest.mark.parametrize("solver", list(K_SOLVERS))
@pytest.mark.parametrize("case", list(K_CASES))
def test_bad_k_is_one_clear_line(solver, case):
    k, pattern = K_CASES[case]
    with pytest.raises(ValueError, match=pattern) as err:
        K_SOLVERS[solver](k)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("solver", list(K_SOLVERS))
@pytest.mark.parametrize("k", [3, np.int64(3), np.int32(3), torch.tensor(3)], ids=["int", "int64", "int32", "tensor"])
def test_integer_k_of_any_integer_type_is_accepted(solver, k):
    sel = K_SOLVERS[solver](k)
    assert len(sel) <= 3


NON_FINITE = {
    "facility_location similarity": (lambda: facility_location(with_entry(SIM, 4, 0, math.inf), 2), "similarity"),
    "omp features": (lambda: omp(with_entry(FEATS, 1, 1, math.nan), FEATS[0], 2), "features"),
    "omp target": (lambda: omp(FEATS, torch.full((5,), math.nan, dtype=torch.float64), 2), "target"),
    "omp_kernel mu": (lambda: omp_kernel(GRAM, torch.full((N,), math.inf, dtype=torch.float64), 1.0, 2), "mu"),
    "greats scores": (lambda: greats_greedy(torch.full((N,), math.nan, dtype=torch.float64), GRAM, 2), "scores"),
    "pursuit scores": (
        lambda: matroid_matching_pursuit(torch.full((N,), -math.inf, dtype=torch.float64), GRAM, 2),
        "scores",
    ),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_inputs_name_the_argument(case):
    call, name = NON_FINITE[case]
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or inf \(rows \[[\d, ]+\]\)") as err:
        call()
    assert "\n" not in str(err.value)


def test_facility_location_does_not_require_symmetry():
    # rows are points, columns candidates: an asymmetric similarity is a valid input
    sel = facility_location(torch.rand(N, N, generator=torch.Generator().manual_seed(2)), 3)
    assert len(sel) == 3
