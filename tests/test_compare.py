"""``mixsel compare`` end to end on a tiny budget, and the CLI entry points."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from mixsel.cli import main
from mixsel.compare import (
    _with_run_means,
    format_cell,
    format_exact_match,
    format_table,
    format_time,
    summarize,
)

from _fast import FAST

pytest.importorskip("transformers")


def test_summarize_and_table():
    results = {
        "a": [{"val/loss_mean": 2.0, "test/exact_match/x": 0.5}, {"val/loss_mean": 4.0, "test/exact_match/x": 1.0}],
        "b": [{"val/loss_mean": 3.0, "test/loss_mean": 3.5}],
    }
    summary = summarize(results)
    assert summary["a"]["val/loss_mean"] == {"mean": 3.0, "std": 2**0.5, "n": 2}  # sample std (n - 1)
    assert summary["b"]["test/loss_mean"] == {"mean": 3.5, "std": 0.0, "n": 1}  # table columns keep their names
    assert summary["a"]["exact_match"]["mean"] == 0.75
    table = format_table(summary)
    assert "| run | seeds | val loss |" in table
    assert "| a | 2 | 3.000 ± 1.414 |" in table
    assert "| b | 1 | 3.000 |" in table
    single = format_table(summarize({"b": results["b"]}))
    assert single.startswith("| run | val loss |") and "| b | 3.000 | - | 3.500 |" in single


def test_exact_match_per_domain_table():
    results = {
        "a": [
            {"test/exact_match/x": 0.5, "test/exact_match/y": 0.0},
            {"test/exact_match/x": 1.0, "test/exact_match/y": 0.5},
        ],
        "b": [{"val/loss_mean": 3.0}],
    }
    summary = summarize(results)
    assert summary["a"]["exact_match/y"] == {"mean": 0.25, "std": pytest.approx(0.125**0.5), "n": 2}  # over seeds
    assert "test/exact_match/y" not in summary["a"] and "exact_match" in summary["a"]
    table = format_exact_match(summary).splitlines()
    assert table[0] == "| run | x | y | mean |"
    assert table[2] == "| a | 0.750 ± 0.354 | 0.250 ± 0.354 | 0.500 ± 0.354 |"
    assert table[3] == "| b | - | - | - |"
    assert format_exact_match(summarize({"b": results["b"]})) == ""  # nothing scored: no table


def test_a_value_only_some_seeds_have_says_how_many():
    results = {"a": [{"val/loss_mean": 2.0, "test/generation/stated/x": 0.5}, {"val/loss_mean": 4.0}]}
    summary = summarize(results)
    assert summary["a"]["generation/stated/x"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert format_cell(summary["a"], "generation/stated/x", "{:.2f}") == "0.50 (1 of 2 seeds)"
    assert format_cell(summary["a"], "val/loss_mean", "{:.1f}") == "3.0 ± 1.4"


def test_time_table_shows_a_dash_for_runs_without_time():
    results = {
        "new": [{"time": {"data_s": 1.0, "model_s": 0.5, "train_s": 3.0, "eval_s": 2.0, "total_s": 7.0}}],
        "old": [{"val/loss_mean": 3.0}],  # finished by a version that did not record "time"
    }
    summary = summarize(results)
    assert summary["new"]["wall_s/train"] == {"mean": 3.0, "std": 0.0, "n": 1}
    table = format_time(summary).splitlines()
    assert table[0] == "| run | data | model | train | eval | total |"
    assert table[2:] == ["| new | 1.0 | 0.5 | 3.0 | 2.0 | 7.0 |", "| old | - | - | - | - | - |"]
    assert format_time(summarize({"old": results["old"]})) == ""  # no run has it: no table


def test_run_means_count_stated_answers_of_older_runs_from_their_generations(tmp_path):
    rows = [
        {"domain": "x", "generated": "2 + 2 = 4\n#### 4"},
        {"domain": "x", "generated": "it is 4"},
        {"domain": "y", "generated": "\\boxed{Na}"},
    ]
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    derived = _with_run_means({"val/loss_mean": 1.0}, tmp_path)
    assert derived["test/generation/stated/x"] == 0.5 and derived["test/generation/stated/y"] == 1.0
    logged = {"test/generation/stated/x": 0.25}  # a newer run logs it: kept as logged
    assert _with_run_means(logged, tmp_path) == logged
    assert _with_run_means({"a": 1.0}, tmp_path / "no-such-run") == {"a": 1.0}


def test_compare_runs_methods_and_chains_reference(tmp_path, capsys):
    spec = {
        "overrides": [*FAST, "train.max_steps=2", "eval.exact_match=1", "eval.max_new_tokens=2"],
        "seeds": [0],
        "output_dir": str(tmp_path / "cmp"),
        "runs": {
            "random": ["selection.method=random"],
            "big_loss": ["selection.method=big_loss"],
            "doremi": ["reweighting.method=doremi", "reweighting.reference_model={run:random}/final"],
        },
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["compare", "--config", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("random", "big_loss", "doremi"):
        assert f"| {name} |" in printed
        assert (tmp_path / "cmp" / name / "seed0" / "result.json").exists()
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert set(summary) == {"random", "big_loss", "doremi"}
    # each run's wall seconds by part (result.json's "time"), in the printed table and summary.json
    assert "| run | data | model | train | eval | total |" in printed
    assert re.search(r"^\| random \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", printed, re.M)
    assert summary["random"]["wall_s/total"]["n"] == 1
    doremi = json.loads((tmp_path / "cmp" / "doremi" / "seed0" / "result.json").read_text())
    assert doremi["config"]["reweighting"]["reference_model"].endswith("random/seed0/final")
    assert abs(sum(doremi["final_weights"]) - 1) < 1e-9


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--quiet", "selection.method=nope"]) == 2
    assert "unknown selector 'nope'" in capsys.readouterr().err
    assert main(["train", "--quiet", "train.max_stepz=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_cli_methods_lists_all(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in (
        "partitionsel",
        "colm",
        "greats",
        "gradmatch",
        "craig",
        "per_domain",
        "hidden_fl",
        "dograph",
        "doremi",
    ):
        assert name in out
    # one line each: name, kind, cost class, what it needs (tests/test_cli.py checks every name)
    assert re.search(r"^partitionsel +selector +gradients +gram, val_scores", out, re.MULTILINE)
    assert re.search(r"^doremi +reweighter +forward +mode loss; reference-model losses", out, re.MULTILINE)


def test_cli_offline_select(tmp_path, capsys):
    import torch

    path = tmp_path / "feats.pt"
    torch.save({"domains": torch.tensor([0, 0, 1, 1]), "loss": torch.tensor([0.1, 0.9, 0.5, 0.2])}, path)
    assert (
        main(
            [
                "select",
                "--features",
                str(path),
                "--method",
                "big_loss",
                "--k",
                "2",
                "--option",
                "per_domain_budgets=false",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert sorted(record["indices"]) == [1, 2]


def test_compare_from_another_directory_reruns_only_changed_runs(tmp_path, monkeypatch, capsys):
    """Paths in a compare file resolve against it; unchanged runs are kept, changed ones trained again."""
    data = ["data.source=data/mix.jsonl", "data.val_per_domain=2", "data.test_per_domain=2"]
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    rows = [{"domain": d, "text": f"{d} example {i} " * 4} for d in ("alpha", "beta") for i in range(16)]
    (project / "data" / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "overrides": [*FAST, *data, "train.max_steps=1", "eval.exact_match=0"],
        "output_dir": "runs",
        "runs": {"random": ["selection.method=random"], "big": ["selection.method=big_loss"]},
    }
    config = project / "cmp.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def stamps():
        return {n: (project / "runs" / n / "seed0" / "result.json").stat().st_mtime_ns for n in ("random", "big")}

    assert main(["compare", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"data: {project / 'data' / 'mix.jsonl'}" in out  # the resolved data path, printed at the start
    assert f"run folder: {project / 'runs' / 'random' / 'seed0'}" in out
    assert "2 domains, max_length=" in out  # the data summary table
    assert list(elsewhere.iterdir()) == []  # nothing lands in the working directory
    first = stamps()

    assert main(["compare", "-q", "--config", str(config)]) == 0  # nothing changed: nothing trains
    assert stamps() == first
    assert capsys.readouterr().out.startswith("| run |")  # -q: the table only

    spec["runs"]["big"].append("selection.options={per_domain_budgets: false}")
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["compare", "--config", str(config)]) == 0
    assert "big/seed0: training again (selection.options.per_domain_budgets" in capsys.readouterr().out
    second = stamps()
    assert second["random"] == first["random"] and second["big"] != first["big"]

    assert main(["compare", "-q", "--config", str(config), "train.max_steps=2"]) == 0  # more steps: all rerun
    assert all(a != b for a, b in zip(stamps().values(), second.values()))
    result = json.loads((project / "runs" / "random" / "seed0" / "result.json").read_text())
    assert result["steps"] == 2


def test_cli_offline_colm_reads_the_dataset_source_sizes(tmp_path, capsys):
    import torch

    path = tmp_path / "feats.pt"
    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    torch.save({"domains": torch.tensor([0, 0, 0, 1, 1, 1]), "zo_grads": feats, "source_sizes": [90, 10]}, path)
    assert main(["select", "--features", str(path), "--method", "colm", "--k", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert sorted(record["indices"][:3]) == [3, 4, 5]  # source 1 is small in the dataset: kept whole
