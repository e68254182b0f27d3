"""The selector contract under random input: a valid selection or a ``ValueError``, never another exception.

For every registered selector, hypothesis draws pools (1-24 candidates, 1-4 domains, some of them
empty, optional domain weights), features (random, all-zero, or with NaN / inf injected into one of
them), budgets ``k`` (including 0, negative and larger than the pool) and, for budgeted selectors,
the budget policy. The selector must either
return exactly ``k`` unique in-range indices with finite weights, respecting the per-domain budgets
of budgeted selectors, or raise ``ValueError``; ``k`` outside ``1..n`` must raise. Derandomised, so
CI runs the same examples every time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mixsel import Selection, available_selectors, get_selector  # noqa: E402
from mixsel.selection import Pool  # noqa: E402
from mixsel.selection.budgets import proportional_budgets  # noqa: E402

# selectors with a `budget` policy (mixsel.selection.budgets.BudgetPolicy) that fills per-domain budgets
BUDGETED = {"stratified", "partitionsel", "per_domain"}


def _features(n: int, m: int, seed: int, kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 0.0 if kind == "zeros" else 1.0
    grads = torch.randn(n, 6, generator=g, dtype=torch.float64) * scale
    val = torch.randn(m, 6, generator=g, dtype=torch.float64) * scale
    loss = torch.rand(n, generator=g, dtype=torch.float64) * 3 * scale
    return {
        "loss": loss,
        "perplexity": loss.exp(),
        "confidence": torch.rand(n, generator=g, dtype=torch.float64) * scale,
        "completion_length": torch.randint(1, 50, (n,), generator=g),
        "grads": grads,
        "grad_norm": grads.norm(dim=1),
        "gram": grads @ grads.T,
        "val_scores": grads @ val.T,
        "val_gram": val @ val.T,
        "hidden": torch.randn(n, 5, generator=g, dtype=torch.float64) * scale,
        "zo_grads": torch.randn(n, 7, generator=g, dtype=torch.float64) * scale,
    }


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 24))
    num_domains = draw(st.integers(1, 4))
    domains = draw(st.lists(st.integers(0, num_domains - 1), min_size=n, max_size=n))
    m = draw(st.integers(1, 3))
    return {
        "n": n,
        "num_domains": num_domains,
        "domains": domains,
        "m": m,
        "val_domains": draw(st.lists(st.integers(0, num_domains - 1), min_size=m, max_size=m)),
        "seed": draw(st.integers(0, 2**16)),
        "kind": draw(st.sampled_from(["random", "random", "zeros", "nan", "inf"])),
        "poisoned": draw(st.sampled_from(sorted(_features(1, 1, 0, "random")))),
        "row": draw(st.integers(0, n - 1)),
        "weights": draw(
            st.none() | st.lists(st.floats(0, 1, allow_nan=False), min_size=num_domains, max_size=num_domains)
        ),
        "k": draw(st.integers(-1, n + 2)),
        "budget": draw(st.sampled_from(["proportional", "weights", "uniform"])),
        "step": draw(st.integers(0, 5)),
    }


def _pool(selector: Any, case: dict[str, Any]) -> Pool:
    feats = _features(case["n"], case["m"], case["seed"], case["kind"])
    if case["kind"] in ("nan", "inf"):
        bad = feats[case["poisoned"]].to(torch.float64)
        bad.reshape(bad.shape[0], -1)[case["row"] if bad.shape[0] == case["n"] else 0, 0] = (
            float("nan") if case["kind"] == "nan" else float("inf")
        )
        feats[case["poisoned"]] = bad
    weights = case["weights"]
    return Pool(
        domains=torch.tensor(case["domains"], dtype=torch.long),
        num_domains=case["num_domains"],
        features={name: feats[name] for name in selector.requires},
        domain_weights=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        step=case["step"],
        lr=1e-2,
        seed=case["seed"],
        val_domains=torch.tensor(case["val_domains"], dtype=torch.long),
    )


@pytest.mark.parametrize("name", available_selectors())
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_selector_returns_a_valid_selection_or_raises_value_error(name, case):
    selector = get_selector(name, **({"budget": case["budget"]} if name in BUDGETED else {}))
    pool = _pool(selector, case)
    n, k = case["n"], case["k"]
    try:
        sel = selector.select(pool, k)
    except ValueError:
        return
    assert 1 <= k <= n, f"k={k} with n={n} must raise ValueError"
    assert isinstance(sel, Selection)
    idx = sel.indices.tolist()
    assert len(idx) == k and len(set(idx)) == k, idx
    assert all(0 <= i < n for i in idx), idx
    assert tuple(sel.weights.shape) == (k,) and bool(torch.isfinite(sel.weights).all()), sel.weights
    if name in BUDGETED:
        budgets = selector.budgets.resolve(pool, k)
        picked = torch.bincount(pool.domains[sel.indices], minlength=case["num_domains"])
        assert bool((picked <= budgets).all()), (picked, budgets)
        if case["budget"] == "proportional":
            assert torch.equal(budgets, proportional_budgets(pool.domain_counts(), k))
