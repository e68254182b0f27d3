"""``mixsel train`` still picks, trains and reweighs exactly as recorded in ``train_golden.json``.

The golden file was recorded before the loop moved onto :mod:`mixsel.engine` (``golden.py``); a
difference here is a change of behaviour, to be made deliberately and re-recorded.
"""

from __future__ import annotations

import json

import pytest

from golden import CASES, GOLDEN, check_steps, make_reference, run_case

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
    check_steps(got, RECORDED[name], loss_rel=1e-6, grad_rel=1e-5, weights_rel=1e-6, weights_abs=1e-9)
