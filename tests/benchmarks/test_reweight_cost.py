"""benchmarks/reweight_cost.py: reading metrics.jsonl by hand, and one --quick run (micro Llama, new code)."""

from __future__ import annotations

import json

import pytest

from _scripts import load_script

reweight_cost = load_script("benchmarks/reweight_cost.py")


def test_read_times_leaves_out_the_warmup(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "time/train": 9.0, "time/reweight": 9.0, "time/select": 1.0, "time/step": 19.0},
        {"step": 2, "time/train": 2.0, "time/reweight": 0.2, "time/select": 0.1, "time/step": 2.3},
        {"step": 3, "time/train": 4.0, "time/reweight": 0.2, "time/select": 0.3, "time/step": 4.5},
        {"step": 3, "val/loss_mean": 1.0},  # an evaluation row has no times
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    times = reweight_cost.read_times(metrics, warmup=1)
    assert times["measured_steps"] == 2
    assert times["steps"]["time/train"] == [9.0, 2.0, 4.0]
    assert times["mean_s"] == {"train": 3.0, "reweight": 0.2, "select": 0.2, "step": 3.4}
    assert times["ratio"] == pytest.approx(0.2 / 3.0, abs=1e-4)
    assert times["ratio_median"] == pytest.approx(0.1)  # per-step ratios 0.1 and 0.05: the upper middle
    assert reweight_cost.read_times(metrics, warmup=5)["measured_steps"] == 3  # too short: keeps every step


def test_quick_run_writes_json_and_plot(tmp_path):
    pytest.importorskip("transformers")
    result = reweight_cost.main(["--quick", "--variants", "uniform,doge", "--steps", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "reweight_cost.json").read_text()) == json.loads(json.dumps(result))
    assert [(r["variant"], r["code"]) for r in result["runs"]] == [("uniform", "new"), ("doge", "new")]
    assert set(result["summary"]) == {"uniform", "doge"} and "old" not in result["commits"]
    for run in result["runs"]:
        assert run["measured_steps"] == 1 and len(run["steps"]["time/train"]) == 2
        assert run["mean_s"]["train"] > 0 and run["ratio"] >= 0
    assert result["settings"]["fixed_overrides"][0] == "train.max_steps=2"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "reweight_cost.png").stat().st_size > 0
