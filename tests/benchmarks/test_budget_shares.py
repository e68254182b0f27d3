"""benchmarks/budget_shares.py: budget shares of random pools against hand-computed probabilities."""

from __future__ import annotations

import json

import pytest

from _scripts import load_script

shares = load_script("benchmarks/budget_shares.py")


def test_one_pick_goes_to_the_lowest_id_under_smallest_first():
    # k=1 from pools of 4, p = (1/4, 3/4): every quota floors to 0 unless one domain fills the pool,
    # so smallest_first gives the unit to "a" (id 0) whenever a is in the pool: 1 - (3/4)^4
    out = shares.budget_shares({"a": 1, "b": 3}, k=1, pool=4, trials=20000, rounding="smallest_first")
    assert out["a"] == pytest.approx(1 - 0.75**4, abs=0.015)
    # largest_remainder gives it to the larger count (ties to id 0): P(count_a >= 2)
    out = shares.budget_shares({"a": 1, "b": 3}, k=1, pool=4, trials=20000, rounding="largest_remainder")
    assert out["a"] == pytest.approx(1 - 0.75**4 - 4 * 0.25 * 0.75**3, abs=0.015)


def test_main_writes_every_rounding(tmp_path):
    out = tmp_path / "s.json"
    assert shares.main(["--trials", "50", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"natural", "smallest_first", "largest_remainder"} <= set(data)
    assert sum(data["smallest_first"].values()) == pytest.approx(1.0, abs=1e-3)
