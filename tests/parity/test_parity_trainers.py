"""``SelectionTrainer`` and ``SelectionSFTTrainer`` pick the same examples as ``mixsel train`` every step,
with the same losses, gradient norms and reweighter weights (the golden record of ``mixsel train``,
``train_golden.json``)."""

from __future__ import annotations

import json

import pytest

from golden import CASES, GOLDEN, check_steps, make_reference

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from trainers import hf_case

RECORDED = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_reference(tmp_path_factory.mktemp("reference"))


def _check(got, want):
    """A trainer's records against mixsel train's: the same picks, numbers to 1e-5 (grad norms 1e-4)."""
    check_steps(got, want, loss_rel=1e-5, grad_rel=1e-4, weights_rel=1e-5, weights_abs=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_trainer_matches_mixsel_train(name, tmp_path, reference):
    _check(hf_case(name, tmp_path, reference), RECORDED[name])


#: TRL runs the same engine; its loss is its own fused-head token loss with each example's tokens
#: weighted (loss_normalization="example" = mixsel train's per-example mean). Left out: DoReMi (the
#: TRL route feeds it per-example, not per-token, excess losses) and CoLM (its SPSA finite differences,
#: eps = 1e-3, amplify the fused head's float rounding of the weights: the picks part at step 3).
TRL_CASES = [n for n in sorted(CASES) if "doremi" not in n and not n.startswith("colm")]


@pytest.mark.parametrize("name", TRL_CASES)
def test_trl_trainer_matches_mixsel_train(name, tmp_path, reference):
    pytest.importorskip("trl")
    _check(hf_case(name, tmp_path, reference, trl=True), RECORDED[name])
