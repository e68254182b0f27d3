"""``mixsel train`` still picks, trains and reweighs exactly as recorded in ``train_golden.json``.

The golden file was recorded before the loop moved onto :mod:`mixsel.engine` (``golden.py``); a
difference here is a change of behaviour, to be made deliberately and re-recorded.
"""

from __future__ import annotations

import json
import math

import pytest

from golden import CASES, GOLDEN, make_reference, run_case

pytest.importorskip("transformers")

RECORDED = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_reference(tmp_path_factory.mktemp("reference"))


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_matches_golden(name, tmp_path, reference):
    got = run_case(name, tmp_path, reference)
    want = RECORDED[name]
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for g, w in zip(got, want):
        assert g["examples"] == w["examples"], f"step {w['step']}: other examples picked"
        assert g["selection_weights"] == pytest.approx(w["selection_weights"], rel=1e-5, abs=1e-6)
        assert math.isclose(g["loss"], w["loss"], rel_tol=1e-6), f"step {w['step']}: loss"
        assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=1e-5), f"step {w['step']}: grad norm"
        assert g["domain_weights"] == pytest.approx(w["domain_weights"], rel=1e-6, abs=1e-9)
