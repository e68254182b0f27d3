"""Compare and single-run plots from synthetic run folders: distinct styles, the headline scatter, bars,
line plots only with enough evaluation points, domain weights of runs whose weights move."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from mixsel.compare import summarize
from mixsel.plots import MIN_POINTS, method_style, plot_compare, plot_run


def test_every_method_gets_its_own_colour_and_marker():
    styles = [method_style(i) for i in range(60)]
    assert len({s["color"] for s in styles[:20]}) == 20  # no colour repeats for 20 methods
    assert len({(s["color"], s["marker"]) for s in styles}) == 60


def _write_run(folder, steps, eval_every, loss0, weights_move):
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "train/loss": loss0 - 0.01 * step, "time/step": 0.5, "time/select": 0.1}
        row["select/frac/a"], row["select/frac/b"] = 0.25, 0.75
        w = 0.5 + (0.01 * step if weights_move else 0.0)
        row["weights/a"], row["weights/b"] = w, 1 - w
        if step % eval_every == 0:
            row["val/loss_mean"] = loss0 - 0.02 * step
            row["val/loss/a"], row["val/loss/b"] = row["val/loss_mean"] - 0.1, row["val/loss_mean"] + 0.1
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"val/loss_mean": rows[-1]["val/loss_mean"], "step_time": 0.5 + loss0 / 10}


def test_compare_plots(tmp_path):
    runs = [f"method{i}" for i in range(18)]
    results = {}
    for i, name in enumerate(runs):
        results[name] = [
            _write_run(tmp_path / name / f"seed{s}", 4, 2, 5.0 + 0.1 * i + 0.05 * s, weights_move=i < 2) for s in (0, 1)
        ]
    (tmp_path / "summary.json").write_text(json.dumps(summarize(results)))
    written = {p.name for p in plot_compare(tmp_path, runs, [0, 1])}
    assert {"quality_vs_cost.png", "final_loss.png", "domain_weights.png", "train_loss.png"} <= written
    # 2 evaluation points per run (< MIN_POINTS): no validation-loss lines over steps
    assert MIN_POINTS > 2 and "val_loss_mean.png" not in written


def test_single_run_plots(tmp_path):
    _write_run(tmp_path / "run", 8, 2, 5.0, weights_move=True)
    written = {p.name for p in plot_run(tmp_path / "run")}
    assert written == {"loss.png", "domain_loss.png", "weights.png", "composition.png"}
