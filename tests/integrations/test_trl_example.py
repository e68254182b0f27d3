"""The runnable TRL example (examples/trl_sft.py): chat data, padding-free CoLM, DoGE weights, resume."""

from __future__ import annotations

import json
import math

import pytest

from _scripts import load_script

pytest.importorskip("trl")
pytest.importorskip("datasets")


@pytest.mark.slow
def test_trl_example_runs_and_resumes(tmp_path):
    module = load_script("examples/trl_sft.py", "trl_sft_example")
    common = [
        "--selector",
        "colm",
        "--padding-free",
        "--reweighter",
        "doge",
        "--max-train-per-domain",
        "8",
        "--batch-size",
        "4",
        "--pool-factor",
        "2",
        "--logging-steps",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    metrics = module.main([*common, "--max-steps", "2"])
    assert math.isfinite(metrics["eval_loss"]) and "eval_mean_token_accuracy" in metrics
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    for key in ("mean_token_accuracy", "num_tokens", "time/select", "weights/arithmetic", "score/arithmetic"):
        assert key in logged[0], key
    assert "ReweightingCallback" in state["stateful_callbacks"]
    module.main([*common, "--max-steps", "4", "--resume"])
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and (tmp_path / "run" / "final").is_dir()
