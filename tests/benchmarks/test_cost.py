"""benchmarks/cost.py: its runner repeats mixsel train's step, and one short run writes every figure."""

from __future__ import annotations

import json

import pytest
import torch

from mixsel.config import load_config

from _fast import FAST
from _scripts import load_script

pytest.importorskip("transformers")


cost = load_script("benchmarks/cost.py")


@pytest.mark.parametrize("method", ["partitionsel", "big_loss"])
def test_the_runner_selects_what_mixsel_train_selects(tmp_path, method):
    from mixsel.train import train

    overrides = [*FAST, f"selection.method={method}", "train.max_steps=1", "eval.exact_match=0"]
    train(load_config(None, [*overrides, f"train.output_dir={tmp_path}", "train.log_selections=true"]), progress=False)
    logged = json.loads((tmp_path / "selections.jsonl").read_text().splitlines()[0])
    cfg = load_config(cost.DEFAULT_CONFIG, overrides)
    runner = cost.Runner(method, cfg, cost.build_shared(cfg))
    seen = {}
    original = runner.online.__call__

    def spy(*args, **kwargs):
        seen["result"] = original(*args, **kwargs)
        return seen["result"]

    runner.online = spy  # type: ignore[assignment]
    runner.step(cost.Clock())
    assert seen["result"].selection.indices.tolist() == logged["pool_index"]


def test_a_short_overhead_run_writes_ratios_and_targets(tmp_path):
    cost.main(
        [
            "--part",
            "overhead",
            "--reps",
            "1",
            "--threads",
            "1",
            "--methods",
            "big_loss",
            "partitionsel",
            "dograph",
            "--override",
            *FAST,
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "cost.json").read_text())
    assert {"meta", "summary", "methods", "targets"} <= set(res)
    assert set(res["methods"]) == {"random", "random_4b", "big_loss", "partitionsel", "dograph"}
    row = res["methods"]["partitionsel"]
    assert row["x_floor"] > 0 and row["peak_mb"] > 0 and row["s_per_step"]["forward"] > 0
    assert res["methods"]["dograph"]["s_per_step"]["reweight"] > 0
    assert res["meta"]["load_start"] >= 0 and (tmp_path / "cost.png").exists()
    assert all(isinstance(t["met"], bool) for t in res["targets"])
    assert torch.isfinite(torch.tensor(res["summary"]["floor_s"]))
