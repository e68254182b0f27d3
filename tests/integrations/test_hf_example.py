"""The runnable example (examples/hf_trainer.py) trains on the embedded corpus and writes its run folder."""

from __future__ import annotations

import json
import math

import pytest

from _scripts import load_script

pytest.importorskip("transformers")
pytest.importorskip("datasets")


@pytest.mark.slow
def test_example_runs_and_resumes(tmp_path):
    module = load_script("examples/hf_trainer.py", "hf_trainer_example")
    common = [
        "--selector",
        "big_loss",
        "--max-train-per-domain",
        "16",
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--pool-factor",
        "2",
        "--logging-steps",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    metrics = module.main([*common, "--max-steps", "2", "--reweighter", "uniform"])
    assert math.isfinite(metrics["eval_loss"])
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and "time/select" in logged[0] and "weights/arithmetic" in logged[0]
    assert "ReweightingCallback" in state["stateful_callbacks"]
    module.main([*common, "--max-steps", "4", "--reweighter", "uniform", "--resume"])
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and (tmp_path / "run" / "final").is_dir()
