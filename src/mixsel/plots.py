"""Plots that read run folders only (``metrics.jsonl``, ``summary.json``); need matplotlib (``mixsel[plot]``).

* :func:`plot_run`: one run's ``<run>/plots/``: ``loss.png`` (training and validation loss),
  ``domain_loss.png`` (validation loss per domain), ``weights.png`` (the reweighter's domain
  weights) and ``composition.png`` (the domain shares of the selected batches); ``mixsel train``
  writes them at the end of every run (``train.plots``).
* :func:`plot_compare`: a comparison's ``<output_dir>/plots/``: the headline
  ``quality_vs_cost.png`` (final validation loss against seconds per step, one marker per method,
  error bars over seeds), ``final_loss.png`` (bars, sorted, error bars over seeds),
  ``domain_weights.png`` (the weights of every run whose weights move) and line plots over steps
  only for runs with at least :data:`MIN_POINTS` evaluation points.

Every method gets its own colour and marker (:func:`method_style`), the same in every figure, and
legends sit outside the axes.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

__all__ = ["MIN_POINTS", "method_style", "plot_compare", "plot_run", "plot_weights", "read_metrics"]

log = logging.getLogger(__name__)

#: line plots over steps need at least this many points per run; fewer read better as a bar or a marker
MIN_POINTS = 4

# 20 colours: matplotlib's tab10, then ten that differ from them in hue or lightness; with the markers
# the pair (colour, marker) of method i is unique for any number of methods.
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000000",
    "#ffd92f",
    "#a6cee3",
    "#b2df8a",
    "#fb9a99",
    "#cab2d6",
    "#6a3d9a",
    "#1b9e77",
    "#08306b",
    "#fdbf6f",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p", "d", "8", "H")


def method_style(i: int) -> dict[str, Any]:
    """Colour and marker of the ``i``-th method: colours repeat only after 20 methods, and then the
    marker differs, so no two methods look alike."""
    colour = _COLOURS[i % len(_COLOURS)]
    marker = _MARKERS[(i + i // len(_COLOURS)) % len(_MARKERS)]
    return {"color": colour, "marker": marker}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (an empty list when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        if isinstance(row.get(key), (int, float)):
            xs.append(row["step"])
            ys.append(row[key])
    return xs, ys


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, target: Path) -> Path:
    """Lay out, write (110 dpi) and close ``fig``; return ``target``."""
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    _pyplot().close(fig)
    return target


def _outside_legend(ax: Any, n: int) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 16 else 2, frameon=False)


def _domain_keys(rows: list[dict], prefix: str) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith(prefix)})


# ---- one run ------------------------------------------------------------------------------------


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png``, ``domain_loss.png``, ``weights.png`` and ``composition.png`` into ``<run>/plots``.

    Returns the files written (none when matplotlib is missing or the run logged nothing).
    """
    try:
        plt = _pyplot()
    except ImportError:
        log.info("matplotlib is not installed: no plots in %s (pip install 'mixsel[plot]')", run_dir)
        return []
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("train/loss", "train (selected batch)", "-"), ("val/loss_mean", "validation", "-o")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, ms=4, label=label)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss.png"))

    keys = [k for k in _domain_keys(rows, "val/loss/")]
    if keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        points = len(_series(rows, keys[0])[0])
        for i, key in enumerate(keys):
            xs, ys = _series(rows, key)
            style = method_style(i)
            if points >= MIN_POINTS:
                ax.plot(xs, ys, ms=4, label=key.split("/")[-1], **style)
            else:  # too few evaluations for a line: the final value per domain
                ax.bar(i, ys[-1], color=style["color"], label=key.split("/")[-1])
        if points >= MIN_POINTS:
            ax.set(xlabel="step", ylabel="validation loss", title="validation loss per domain")
        else:
            ax.set_xticks(range(len(keys)), [k.split("/")[-1] for k in keys], rotation=30, ha="right")
            ax.set(ylabel="validation loss", title=f"validation loss per domain (step {rows[-1]['step']})")
            lo = min(_series(rows, k)[1][-1] for k in keys)
            ax.set_ylim(bottom=max(0.0, lo - 0.5))
        _outside_legend(ax, len(keys))
        written.append(_save(fig, out / "domain_loss.png"))

    target = plot_weights(run_dir, out / "weights.png")
    if target is not None:
        written.append(target)

    keys = _domain_keys(rows, "select/frac/")
    if keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [row["step"] for row in rows if keys[0] in row]
        shares = [[row.get(k, 0.0) for row in rows if keys[0] in row] for k in keys]
        colours = [method_style(i)["color"] for i in range(len(keys))]
        ax.stackplot(xs, shares, labels=[k.split("/")[-1] for k in keys], colors=colours, alpha=0.85)
        ax.set(xlabel="step", ylabel="share of the selected batch", title="selection composition", ylim=(0, 1))
        _outside_legend(ax, len(keys))
        written.append(_save(fig, out / "composition.png"))
    return written


def plot_weights(run_dir: str | Path, target: str | Path | None = None) -> Path | None:
    """Domain weights (``weights/<domain>``) over steps of one run; ``None`` if it logged none."""
    plt = _pyplot()
    rows = read_metrics(run_dir)
    keys = _domain_keys(rows, "weights/")
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _draw_weights(ax, rows, keys)
    ax.set(xlabel="step", ylabel="domain weight", title="domain weights")
    _outside_legend(ax, len(keys))
    return _save(fig, Path(target or Path(run_dir) / "weights.png"))


def _draw_weights(ax: Any, rows: list[dict], keys: list[str]) -> None:
    for i, key in enumerate(keys):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, ms=3, markevery=max(1, len(xs) // 10), label=key.split("/", 1)[1], **method_style(i))


def _moves(rows: list[dict], keys: list[str]) -> bool:
    return any(len({round(r[k], 6) for r in rows if k in r}) > 1 for k in keys)


# ---- a comparison ---------------------------------------------------------------------------------


def _cell(row: dict, key: str) -> tuple[float, float] | None:
    cell = row.get(key)
    return (cell["mean"], cell["std"]) if isinstance(cell, dict) else None


def plot_compare(output_dir: str | Path, runs: list[str], seeds: list[int]) -> list[Path]:
    """The comparison's figures in ``<output_dir>/plots`` (see the module doc); reads ``summary.json``."""
    plt = _pyplot()
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    styles = {name: method_style(i) for i, name in enumerate(runs)}
    metrics = {name: [read_metrics(output_dir / name / f"seed{s}") for s in seeds] for name in runs}
    written = [
        _quality_vs_cost(plt, summary, runs, styles, plots / "quality_vs_cost.png"),
        _final_bars(plt, summary, runs, styles, plots / "final_loss.png"),
        _compare_weights(plt, metrics, plots / "domain_weights.png"),
    ]
    for key, title in [
        ("val/loss_mean", "validation loss (mean over domains)"),
        ("val/loss_worst", "validation loss (worst domain)"),
        ("train/loss", "training loss of the selected batch"),
        ("select/conflicts", "conflicting gradient pairs in the selected batch"),
    ]:
        written.append(_lines(plt, metrics, styles, key, title, plots / (key.replace("/", "_") + ".png")))
    return [p for p in written if p is not None]


def _quality_vs_cost(plt: Any, summary: dict, runs: list[str], styles: dict, target: Path) -> Path | None:
    points = [(n, _cell(summary.get(n, {}), "val/loss_mean"), _cell(summary.get(n, {}), "step_time")) for n in runs]
    points = [(n, q, c) for n, q, c in points if q is not None and c is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (q, q_std), (c, c_std) in points:
        style = styles[name]
        ax.errorbar(c, q, xerr=c_std, yerr=q_std, ms=8, ls="none", capsize=3, label=name, mec="black", mew=0.5, **style)
    ax.set(xlabel="seconds per step (lower is cheaper)", ylabel="final validation loss (lower is better)")
    ax.set_title("quality vs cost (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    _outside_legend(ax, len(points))
    return _save(fig, target)


def _final_bars(plt: Any, summary: dict, runs: list[str], styles: dict, target: Path) -> Path | None:
    cells = {n: _cell(summary.get(n, {}), "val/loss_mean") for n in runs}
    names = sorted((n for n in runs if cells[n] is not None), key=lambda n: cells[n][0])
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4.5))
    means = [cells[n][0] for n in names]
    ax.bar(
        range(len(names)),
        means,
        yerr=[cells[n][1] for n in names],
        capsize=3,
        color=[styles[n]["color"] for n in names],
        edgecolor="black",
        linewidth=0.5,
    )
    spread = max(means) - min(means)
    ax.set_ylim(max(0.0, min(means) - max(1.0 * spread, 0.05)), max(means) + max(0.5 * spread, 0.05))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="final validation loss", title="final validation loss, best first (mean ± std over seeds)")
    return _save(fig, target)


def _lines(plt: Any, metrics: dict, styles: dict, key: str, title: str, target: Path) -> Path | None:
    """Mean over seeds per step; only runs with at least MIN_POINTS points (else the figure is skipped)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for name, seeds in metrics.items():
        curves = [dict(zip(*_series(rows, key))) for rows in seeds]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if len(steps) < MIN_POINTS:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        ax.plot(steps, mean, ms=4, markevery=max(1, len(steps) // 8), label=name, **styles[name])
        if len(curves) > 1:
            std = [statistics.stdev([c[s] for c in curves]) for s in steps]
            lower = [m - s for m, s in zip(mean, std)]
            upper = [m + s for m, s in zip(mean, std)]
            ax.fill_between(steps, lower, upper, color=styles[name]["color"], alpha=0.12)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel=key, title=title)
    _outside_legend(ax, drawn)
    return _save(fig, target)


def _compare_weights(plt: Any, metrics: dict, target: Path) -> Path | None:
    """One panel per run whose domain weights move (its first seed)."""
    moving = {}
    for name, seeds in metrics.items():
        rows = seeds[0] if seeds else []
        keys = _domain_keys(rows, "weights/")
        if keys and _moves(rows, keys):
            moving[name] = (rows, keys)
    if not moving:
        return None
    cols = min(3, len(moving))
    nrows = -(-len(moving) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1.5, 3.2 * nrows), squeeze=False, sharey=True)
    for ax, (name, (rows, keys)) in zip(axes.flat, moving.items()):
        _draw_weights(ax, rows, keys)
        ax.set(title=name, xlabel="step")
    for ax in axes.flat[len(moving) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("domain weight")
    first = axes.flat[min(len(moving), cols) - 1]
    _outside_legend(first, len(next(iter(moving.values()))[1]))
    return _save(fig, target)
