"""``mixsel compare``: several methods on the same data, steps and seeds; a table and plots.

A compare file is YAML::

    base: default.yaml            # an experiment YAML, relative to this file (or omitted: defaults)
    overrides: [train.max_steps=60]   # applied to every run
    seeds: [0, 1]
    output_dir: runs/compare
    runs:                          # name -> overrides of that run
      random: [selection.method=random]
      stratified: [selection.method=stratified]
      doremi: [reweighting.method=doremi, "reweighting.reference_model={run:random}/final"]

``{run:NAME}`` stands for the folder of an earlier run with the same seed (e.g. DoReMi's reference
model is the random-selection run trained on the natural mixture). Each run writes its own folder
``<output_dir>/<name>/seed<s>/`` (config, metrics, result); the summary goes to
``<output_dir>/summary.json`` and ``summary.md``, plots to ``<output_dir>/plots/``.
A run whose ``result.json`` exists is skipped, so an interrupted comparison continues.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from mixsel.config import load_config

__all__ = ["format_table", "run_compare", "summarize"]

_COLUMNS = [
    ("val/loss_mean", "val loss", "{:.3f}"),
    ("val/loss_worst", "worst domain", "{:.3f}"),
    ("test/loss_mean", "test loss", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("conflicts", "conflicts/step", "{:.1f}"),
    ("step_time", "s/step", "{:.2f}"),
    ("select_time", "select s/step", "{:.2f}"),
    ("wall_time_s", "time (s)", "{:.0f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
]


def _metric(result: dict[str, Any], key: str) -> float | None:
    if key == "exact_match":
        vals = [v for k, v in result.items() if k.startswith("test/exact_match/")]
        return sum(vals) / len(vals) if vals else None
    value = result.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation (n - 1) over seeds of each table column, per run name."""
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for key, _, _ in _COLUMNS:
            vals = [v for v in (_metric(r, key) for r in runs) if v is not None and math.isfinite(v)]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        summary[name] = row
    return summary


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One summary cell: ``mean ± std`` when the row has several seeds, ``mean`` for one, ``-`` if absent."""
    cell = row.get(key)
    if not isinstance(cell, dict):
        return "-"
    if row.get("seeds", 1) > 1:
        return f"{fmt.format(cell['mean'])} ± {fmt.format(cell['std'])}"
    return fmt.format(cell["mean"])


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the summary (mean ± std over seeds; a ``seeds`` column when some run has several)."""
    many = any(row["seeds"] > 1 for row in summary.values())
    titles = (["seeds"] if many else []) + [title for _, title, _ in _COLUMNS]
    lines = ["| run | " + " | ".join(titles) + " |", "|" + "---|" * (len(titles) + 1)]
    for name, row in summary.items():
        cells = ([str(row["seeds"])] if many else []) + [format_cell(row, key, fmt) for key, _, fmt in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_run_means(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Add per-step means from ``metrics.jsonl`` to ``result``: conflicting gradient pairs (when a Gram
    was computed), seconds per step and seconds of selection (pool features + solver) per step."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        means = (("select/conflicts", "conflicts"), ("time/step", "step_time"), ("time/select", "select_time"))
        for key, name in means:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                result = {**result, name: statistics.fmean(vals)}
    return result


def _substitute(override: str, out: Path, seed: int, done: dict[str, list[dict[str, Any]]]) -> str:
    """Replace ``{run:NAME}`` by the folder of run NAME with the same seed (it must come earlier)."""
    while "{run:" in override:
        start = override.index("{run:")
        end = override.index("}", start)
        name = override[start + 5 : end]
        if name not in done:
            raise ValueError(f"override {override!r} refers to run {name!r}, which must be listed before it")
        override = override[:start] + str(out / name / f"seed{seed}") + override[end + 1 :]
    return override


def run_compare(path: str | Path, extra_overrides: list[str] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run every (run, seed) of the compare file ``path``; return the summary."""
    from mixsel.train import train

    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"base", "overrides", "seeds", "output_dir", "runs"}
    if unknown:
        raise KeyError(f"unknown compare keys {sorted(unknown)}; valid: base, overrides, seeds, output_dir, runs")
    if not spec.get("runs"):
        raise ValueError(f"{path}: 'runs' must map run names to lists of overrides")
    base = spec.get("base")
    base_path = (path.parent / base) if base else None
    common = list(spec.get("overrides") or []) + list(extra_overrides or [])
    seeds = list(spec.get("seeds") or [0])
    out = Path(spec.get("output_dir", "runs/compare"))
    for item in common:
        if item.startswith("train.output_dir="):
            out = Path(item.split("=", 1)[1])
    results: dict[str, list[dict[str, Any]]] = {}
    for name, overrides in spec["runs"].items():
        results[name] = []
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            done = run_dir / "result.json"
            if done.exists():
                results[name].append(_with_run_means(json.loads(done.read_text()), run_dir))
                continue
            run_overrides = [_substitute(o, out, seed, results) for o in overrides or []]
            cfg = load_config(
                base_path, [*common, *run_overrides, f"seed={seed}", f"train.output_dir={run_dir}", f"name={name}"]
            )
            results[name].append(_with_run_means(train(cfg, progress=progress), run_dir))
    summary = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    (out / "summary.md").write_text(table + "\n")
    try:
        from mixsel.plots import plot_compare

        plot_compare(out, list(results), seeds)
    except ImportError:  # matplotlib is optional (pip install mixsel[plot])
        pass
    return {"summary": summary, "table": table, "output_dir": str(out)}
