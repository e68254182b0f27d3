"""benchmarks/run_experiments.py: task planning, dependencies, light copies, summaries and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _fast import FAST
from _scripts import load_script

pytest.importorskip("transformers")


runner = load_script("benchmarks/run_experiments.py")


def test_refs_finds_every_run_reference():
    assert runner._refs(["a=1", "b={run:x}/final", "c={run:y}/f+{run:z}"]) == ["x", "y", "z"]
    assert runner._refs([]) == []


def test_plan_orders_by_phase_dedups_and_filters(tmp_path):
    exp = tmp_path / "exps" / "e1"
    exp.mkdir(parents=True)
    (exp / "c.yaml").write_text(
        yaml.safe_dump({"seeds": [0, 1], "runs": {"a": [], "b": ["r={run:a}/final"]}}, sort_keys=False)
    )
    plan = [("e1/c.yaml", [0], None), ("e1/c.yaml", [1], ["b"]), ("e1/c.yaml", [0, 1, 7], None)]  # no seed 7
    tasks = runner.plan_tasks(plan, tmp_path / "exps", None)
    assert [t.key for t in tasks] == [("e1", "a", 0), ("e1", "b", 0), ("e1", "b", 1), ("e1", "a", 1)]
    assert tasks[1].deps == ["a"]
    assert runner.plan_tasks(plan, tmp_path / "exps", {"other"}) == []


def test_overhead_skips_first_step_and_averages():
    rows = [{"step": 1, "time/step": 100.0}, {"step": 2, "time/step": 1.0}, {"step": 3, "time/step": 3.0}]
    assert runner._overhead(rows) == {"time/step": 2.0}


def test_conflicts_table_adds_gradient_mismatch_when_logged():
    rows = [
        {"step": 2, "select/conflicts_random": 3.0, "select/grad_mismatch": 0.5, "select/grad_mismatch_random": 0.25},
        {"step": 3, "select/conflicts_random": 5.0, "select/grad_mismatch": 1.5, "select/grad_mismatch_random": 0.75},
        {"step": 4, "select/grad_mismatch": float("nan")},
    ]
    extras = runner._overhead(rows)
    assert extras == {"conflicts_random": 4.0, "grad_mismatch": 1.0, "grad_mismatch_random": 0.5}
    row = {"seeds": 1, "conflicts": {"mean": 2.0}, **{k: {"mean": v} for k, v in extras.items()}}
    table = runner.conflicts_table({"m": row})
    assert "gradient mismatch to the pool, selected |" in table.splitlines()[0]
    assert "| m | 2.0 | 4.0 | 1.000 | 0.500 |" in table
    plain = runner.conflicts_table({"m": {"seeds": 1, "conflicts": {"mean": 2.0}, "conflicts_random": {"mean": 4.0}}})
    assert plain.splitlines()[-1] == "| m | 2.0 | 4.0 |"


def test_picks_average_domain_shares_over_steps_and_tabulate():
    rows = [
        {"step": 1, "select/frac/a": 0.75, "select/frac/b": 0.25},
        {"step": 2, "select/frac/a": 0.25, "select/frac/b": 0.75},
        {"step": 3, "select/frac/a": 0.5, "select/frac/b": 0.5, "val/loss_mean": 3.0},
    ]
    assert runner._picks(rows) == {"a": 0.5, "b": 0.5}
    summary = {"random": {"per_domain_picks": {"a": 0.5, "b": 0.5}}, "m": {"per_domain_picks": {"a": 0.125}}, "x": {}}
    table = runner.picks_table(summary)
    assert table.splitlines()[0] == "| run | a | b |"
    assert "| random | 0.500 | 0.500 |" in table and "| m | 0.125 | - |" in table and "| x |" not in table
    assert runner.picks_table({"x": {}}) == ""


def test_seconds_accumulate_step_times_in_step_order():
    plots = load_script("benchmarks/plot_experiments.py")
    rows = [{"step": 2, "time/step": 3.0}, {"step": 1, "time/step": 1.5}, {"step": 2, "val/loss_mean": 4.0}]
    assert plots._seconds(rows) == {1: 1.5, 2: 4.5}


def test_timing_experiments_run_alone(tmp_path, monkeypatch):
    """A run of an EXCLUSIVE experiment never overlaps another run, in either direction."""
    import argparse

    exps = tmp_path / "exps"
    for name in ("timing", "other"):
        (exps / name).mkdir(parents=True)
        (exps / name / "c.yaml").write_text(yaml.safe_dump({"runs": {"a": [], "b": [], "c": []}}))
    monkeypatch.setattr(runner, "EXCLUSIVE", {"timing"})
    running: set[str] = set()
    overlaps: list[tuple[str, ...]] = []

    class FakeProc:
        """Finishes on its second poll; records which runs were alive together."""

        pid = 1

        def __init__(self, cmd, **kwargs):
            self.name = Path(cmd[cmd.index("--config") + 1]).stem
            self.polls, self.returncode = 0, None
            running.add(self.name)
            if len(running) > 1 and any(n.startswith("timing") for n in running):
                overlaps.append(tuple(sorted(running)))

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            running.discard(self.name)
            self.returncode = 0
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    monkeypatch.setattr(runner, "copy_light", lambda work, results, task: task.key in finished)
    finished: set[tuple[str, str, int]] = set()
    real_poll = FakeProc.poll

    def poll(self):
        code = real_poll(self)
        if code == 0:
            exp, run, seed = self.name.split("__")
            finished.add((exp, run, int(seed.removeprefix("seed"))))
        return code

    monkeypatch.setattr(FakeProc, "poll", poll)
    plan = [("other/c.yaml", [0], ["a"]), ("timing/c.yaml", [0], None), ("other/c.yaml", [0], None)]
    tasks = runner.plan_tasks(plan, exps, None)
    args = argparse.Namespace(work=str(tmp_path / "work"), results=str(tmp_path / "res"), jobs=2, budget_minutes=None)
    report = runner.run_tasks(tasks, args, [])
    assert len(report["finished"]) == 6 and not report["failed"]
    assert overlaps == []


def test_runner_end_to_end_two_steps(tmp_path):
    exps = tmp_path / "exps"
    (exps / "tiny").mkdir(parents=True)
    spec = {
        "overrides": [*FAST, "train.max_steps=2", "eval.exact_match=1", "eval.max_new_tokens=2"],
        "seeds": [0],
        "output_dir": "ignored",
        "runs": {
            "random": ["selection.method=random"],
            "doremi": ["reweighting.method=doremi", "reweighting.reference_model={run:random}/final"],
        },
    }
    (exps / "tiny" / "compare.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--experiments", str(exps), "--work", str(work), "--results", str(results), "--jobs", "2"]
    assert runner.main(args) == 0
    for name in ("random", "doremi"):
        run = results / "tiny" / name / "seed0"
        assert (run / "result.json").exists() and (run / "metrics.jsonl").exists()
        assert not (run / "final").exists()  # checkpoints stay in the work folder
        generations = (work / "tiny" / name / "seed0" / "generations.jsonl").read_text()
        assert (run / "generations.jsonl").read_text() == generations  # the exact-match texts come along
        assert (work / "tiny" / name / "seed0" / "final").exists()
    summary = json.loads((results / "tiny" / "summary.json").read_text())
    assert list(summary) == ["random", "doremi"]
    assert summary["random"]["seeds"] == 1 and "time/step" in summary["random"]
    assert any(k.startswith("generation/stated/") for k in summary["random"])
    assert set(summary["random"]["per_domain_picks"]) == set(summary["random"]["per_domain_val"])
    assert (results / "tiny" / "plots" / "val_loss_mean.png").exists()
    assert (results / "tiny" / "plots" / "val_loss_time.png").exists()
    assert (results / "tiny" / "plots" / "weights_doremi.png").exists()  # DoReMi's weights move


def test_fill_doc_replaces_only_marked_tables():
    summary = {
        "random": {"seeds": 2, "val/loss_mean": {"mean": 6.5, "std": 0.25}, "per_domain_val": {"x": 1.0, "y": 2.0}},
    }
    doc = (
        "intro\n<!-- table e1/main -->\nold\n<!-- end table -->\nmiddle prose\n"
        "<!-- table e1/domains -->\n<!-- end table -->\n<!-- table e9/main -->\nstale\n<!-- end table -->\nend\n"
    )
    out = runner.fill_doc(doc, {"e1": summary})
    assert "old" not in out and "stale" not in out
    assert out.startswith("intro\n") and "middle prose" in out and out.endswith("end\n")
    assert "| random | 2 | 6.500 ± 0.250 |" in out
    assert "| random | 1.000 | 2.000 |" in out
    assert "no results for e9 yet" in out
    assert runner.fill_doc(out, {"e1": summary}) == out  # idempotent
    with pytest.raises(ValueError, match="unknown table kind"):
        runner.fill_doc("<!-- table e1/bogus -->\n<!-- end table -->", {"e1": summary})


def test_paired_table_differences_by_seed():
    summary = {
        "random": {"seeds": 3, "per_seed_val": {"0": 6.0, "1": 6.5, "2": 7.0}},
        "m": {"seeds": 3, "per_seed_val": {"0": 5.9, "1": 6.4, "2": 7.1}},
        "short": {"seeds": 1, "per_seed_val": {"1": 6.2}},
    }
    table = runner.paired_table(summary, "random")
    assert "| m | -0.033 ± 0.115 | 2 of 3 seeds | -0.100, -0.100, +0.100 |" in table
    assert "| short | -0.300 | 1 of 1 seeds | -0.300 |" in table
    assert "| random |" not in table
    doc = runner.fill_doc("<!-- table e/paired:random -->\n<!-- end table -->", {"e": summary})
    assert "| m | -0.033" in doc
    with pytest.raises(ValueError, match="names its baseline"):
        runner.fill_doc("<!-- table e/paired -->\n<!-- end table -->", {"e": summary})


def test_paired_exact_match_and_per_domain_exact_match_tables():
    summary = {
        "random": {"seeds": 2, "per_seed_em": {"0": 0.10, "1": 0.20}, "exact_match/x": {"mean": 0.15, "std": 0.07}},
        "m": {"seeds": 2, "per_seed_em": {"0": 0.25, "1": 0.15}, "exact_match/x": {"mean": 0.2, "std": 0.07}},
    }
    doc = runner.fill_doc("<!-- table e/paired_em:random -->\n<!-- end table -->", {"e": summary})
    assert "| run | Δ exact match vs random (mean ± std over seeds) | higher than random in | per seed |" in doc
    assert "| m | +0.050 ± 0.141 | 1 of 2 seeds | +0.150, -0.050 |" in doc
    doc = runner.fill_doc("<!-- table e/exact_match -->\n<!-- end table -->", {"e": summary})
    assert "| run | x | mean |" in doc and "| m | 0.200 ± 0.070 | - |" in doc


def test_generation_table_per_domain_over_the_seeds_that_have_it():
    summary = {
        "random": {"seeds": 1, "val/loss_mean": {"mean": 2.0, "std": 0.0, "n": 1}},
        "m": {
            "seeds": 3,
            "generation/stated/x": {"mean": 0.75, "std": 0.1, "n": 2},
            "generation/finished/x": {"mean": 0.5, "std": 0.2, "n": 3},
            "generation/tokens/x": {"mean": 41.6, "std": 3.0, "n": 3},
        },
    }
    lines = runner.generation_table(summary).splitlines()
    assert lines[0] == "| run | answer line: x | ended: x | tokens: x |"
    assert lines[2:] == ["| m | 0.75 ± 0.10 (2 of 3 seeds) | 0.50 ± 0.20 | 42 ± 3 |"]  # no generations: no row
    assert runner.generation_table({"random": summary["random"]}) == ""


def test_task_yaml_lists_dependencies_of_dependencies(tmp_path):
    spec_path = tmp_path / "exp" / "compare.yaml"
    spec_path.parent.mkdir()
    spec = {
        "base": None,
        "runs": {
            "uniform": ["selection.method=random"],
            "other": ["selection.method=stratified"],
            "doremi": ["reweighting.reference_model={run:uniform}/final"],
            "two_stage": ["reweighting.options={weights_from: {run:doremi}}"],
        },
    }
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    task = runner.Task(spec_path, "exp", "two_stage", 1, ["doremi"])
    written = yaml.safe_load(runner._task_yaml(task, tmp_path / "work", []).read_text())
    assert list(written["runs"]) == ["uniform", "doremi", "two_stage"]  # uniform: doremi's reference


def test_runners_sharing_a_work_folder_split_the_tasks(tmp_path, monkeypatch):
    """A task another live runner holds is left to it (its dependents wait for its result); a stale
    lock, whose processes are gone, is taken over."""
    import argparse
    import subprocess

    exps = tmp_path / "exps"
    (exps / "e").mkdir(parents=True)
    (exps / "e" / "c.yaml").write_text(
        yaml.safe_dump({"runs": {"a": [], "b": ["selection.options={weights_from: a}"], "c": []}})
    )
    monkeypatch.setattr(runner, "_refs", lambda overrides: ["a"] if overrides else [])
    tasks = runner.plan_tasks([("e/c.yaml", [0], None)], exps, None)
    work = tmp_path / "work"
    a, b, c = tasks
    assert b.deps == ["a"]
    other = subprocess.Popen(["sleep", "30"])  # the other runner, alive
    gone = subprocess.Popen(["true"])
    gone.wait()  # a runner that was killed: its lock is stale
    try:
        for task, pid in ((a, other.pid), (c, gone.pid)):
            runner._lock_path(work, task).parent.mkdir(parents=True, exist_ok=True)
            runner._lock_path(work, task).write_text(f"{pid}\n")
        started: list[str] = []
        checks = {"a": 0}

        class FakeProc:
            pid = 1

            def __init__(self, cmd, **kwargs):
                self.name = Path(cmd[cmd.index("--config") + 1]).stem.split("__")[1]
                started.append(self.name)
                self.returncode = 0

            def poll(self):
                return 0

        def copy_light(work_, results, task):
            if task.run == "a":  # the other runner's run finishes after a few checks
                checks["a"] += 1
                return checks["a"] > 3
            return task.run in started

        monkeypatch.setattr(runner.subprocess, "Popen", FakeProc)
        monkeypatch.setattr(runner.time, "sleep", lambda s: None)
        monkeypatch.setattr(runner, "copy_light", copy_light)
        args = argparse.Namespace(work=str(work), results=str(tmp_path / "res"), jobs=1, budget_minutes=None)
        report = runner.run_tasks(tasks, args, [])
    finally:
        other.kill()
        other.wait()
    assert report["elsewhere"] == ["e/a/0"]
    assert sorted(report["finished"]) == ["e/b/0", "e/c/0"] and not report["failed"]
    assert started == ["c", "b"]  # c (stale lock taken over) first; b once a's result appeared
    # this runner's locks are released; the other runner's stays
    assert [p.name for p in (work / "locks").iterdir()] == ["e__a__seed0.lock"]
