"""benchmarks/hf_semantics.py: the summary from hand-made runs, and one --quick run (tiny Llama, new code)."""

from __future__ import annotations

import json

import pytest

from _scripts import load_script

hf_semantics = load_script("benchmarks/hf_semantics.py")


def _run(code, name, share=(1 / 3, 1 / 3, 1 / 3), losses=(1.0, 2.0), calls=1.0, ks=None, rows=12):
    return {
        "code": code,
        "trainer": "hf",
        "name": name,
        "trained_share": list(share),
        "trained_rows": rows,
        "step_losses": list(losses),
        "selector_calls_per_step": calls,
        "k_per_call": ks or {"4": 3},
        "final_weights": [0.5, 0.25, 0.25],
    }


def test_summary_and_table_from_hand_made_runs():
    runs = [
        _run("old", "static 0.8/0.1/0.1 (sampling)"),
        _run("new", "static 0.8/0.1/0.1 (sampling)", share=(0.75, 0.125, 0.125)),
        _run("old", "reweighter=None"),
        _run("old", "reweighter=dograph"),
        _run("new", "reweighter=None", losses=(1.0, 2.0, 3.0)),
        _run("new", "reweighter=dograph", losses=(1.0, 2.5, 2.75)),
        _run("old", "random, batch 1 x accumulation 4", calls=4.0, ks={"1": 12}),
        _run("new", "random, batch 1 x accumulation 4"),
        _run("old", "colm default", share=(0.75, 0.25, 0.0)),
        _run("new", "colm default", share=(0.5, 0.25, 0.25)),
        _run("new", "colm rounding=carry"),
    ]
    summary, lines = hf_semantics.summarise(runs)
    s = summary["hf"]
    assert s["1_static_trained_share"]["new"] == [0.75, 0.125, 0.125]
    assert s["1_dograph_vs_none"]["old"]["identical"] is True
    new = s["1_dograph_vs_none"]["new"]
    assert not new["identical"] and new["steps_differing"] == 2 and new["max_abs_diff"] == pytest.approx(0.5)
    assert s["2_selector_calls"]["old"] == {"per_step": 4.0, "k_per_call": {"1": 12}}
    assert s["3_colm_trained_share"]["new_carry"] == [1 / 3, 1 / 3, 1 / 3]
    assert "3_partitionsel_trained_share" not in s  # no runs, no row
    table = "\n".join(lines)
    assert "| 2 accumulation | HF | selector calls | 4 calls/step, k=1 | 1 calls/step, k=4 | |" in table
    assert "| 3 colm | HF | trained share a/b/c | 0.75/0.25/0.00 (n=12) | 0.50/0.25/0.25 (n=12) |" in table
    assert "identical to None (2 steps)" in table and "differ in 2/3 steps" in table


def test_quick_run_new_code(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    out = tmp_path / "hf_semantics.json"
    result = hf_semantics.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {r["code"] for r in result["runs"]} == {"new"} and "old" not in result["commits"]
    assert result["settings"]["quick"] is True
    for r in result["runs"]:
        assert r["steps"] == r["args"]["max_steps"]
        assert r["trained_rows"] == r["steps"] * 4 and sum(r["trained_counts"]) == r["trained_rows"]
        # one selection per optimiser step of the whole accumulated batch (item 2)
        assert r["selector_calls_per_step"] == 1 and list(r["k_per_call"]) == ["4"]
        assert r["selector_calls"] == r["steps"]
    names = {(r["trainer"], r["name"]) for r in result["runs"]}
    assert ("hf", "partitionsel rounding=carry") in names and ("hf", "reweighter=dograph") in names
    dograph = next(r for r in result["runs"] if r["name"] == "reweighter=dograph")
    assert sum(dograph["final_weights"]) == pytest.approx(1.0)
    assert result["table"][0].startswith("| item |")
