"""Plots of the evidence experiments; reads ``benchmarks/results/experiments/`` only (never trains).

    python benchmarks/plot_experiments.py [RESULTS_DIR]

Per experiment folder (``<exp>/<run>/seed<s>/metrics.jsonl`` + ``summary.json``) it draws, into
``<exp>/plots/``: validation loss (mean and worst domain) over steps and the mean against training
seconds (the compute-matched view), mean ± std over seeds; final losses as bars with std error
bars; the per-step time split (features / solver / train); conflicting gradient pairs in the
selected vs a random batch (when logged); per-domain final validation loss; and the domain weights
over steps of every run whose weights move (reweighting).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mixsel.plots import plot_weights, read_metrics

__all__ = ["plot_all", "plot_experiment"]


def _save(fig: plt.Figure, target: Path) -> Path:
    """Lay out, write (100 dpi) and close ``fig``; return ``target``."""
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def _curve(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}


def _runs(folder: Path, summary: dict) -> dict[str, list[list[dict]]]:
    """Run name -> metrics rows of each seed, in summary order."""
    out = {}
    for run in summary:
        seeds = sorted((folder / run).glob("seed*/metrics.jsonl"))
        out[run] = [read_metrics(p.parent) for p in seeds]
    return out


def _seconds(rows: list[dict]) -> dict[int, float]:
    """Step -> training seconds up to the end of that step (the sum of ``time/step``; evaluation excluded)."""
    out, total = {}, 0.0
    for r in sorted((r for r in rows if isinstance(r.get("time/step"), (int, float))), key=lambda r: r["step"]):
        total += r["time/step"]
        out[r["step"]] = total
    return out


def _plot_curves(
    runs: dict[str, list[list[dict]]], key: str, title: str, target: Path, *, x: str = "step"
) -> Path | None:
    """``key`` against the step (``x="step"``) or against the training seconds spent so far
    (``x="seconds"``, mean over seeds: the compute-matched view), mean ± std over seeds."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    drawn = False
    colors = plt.get_cmap("tab20")  # 20 distinct colours: experiment 1 has 16 runs
    for i, (name, seeds) in enumerate(runs.items()):
        curves = [_curve(rows, key) for rows in seeds]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if x == "seconds":
            clocks = [_seconds(rows) for rows in seeds]
            steps = [s for s in steps if all(s in c for c in clocks)]
        if not steps:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        std = [statistics.stdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
        xs = [statistics.fmean(c[s] for c in clocks) for s in steps] if x == "seconds" else steps
        dashed = "random" in name or name in ("uniform", "stratified")  # the baselines
        (line,) = ax.plot(
            xs,
            mean,
            marker="o",
            ms=3,
            ls="--" if dashed else "-",
            color=colors(i % 20),
            label=f"{name} (n={len(curves)})",
        )
        if len(curves) > 1:
            ax.fill_between(
                xs,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=line.get_color(),
                alpha=0.15,
            )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training seconds (sum of time/step)" if x == "seconds" else "step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, target)


def _plot_final(summary: dict, target: Path) -> Path | None:
    names = [n for n in summary if "val/loss_mean" in summary[n]]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 4.5))
    xs = range(len(names))
    for offset, key, label in [(-0.2, "val/loss_mean", "mean over domains"), (0.2, "val/loss_worst", "worst domain")]:
        ax.bar(
            [x + offset for x in xs],
            [summary[n][key]["mean"] for n in names],
            width=0.4,
            yerr=[summary[n][key]["std"] for n in names],
            capsize=2,
            label=label,
        )
    lo = min(summary[n]["val/loss_mean"]["mean"] for n in names)
    hi = max(summary[n]["val/loss_worst"]["mean"] for n in names)
    ax.set_ylim(lo - 0.3 * (hi - lo + 0.1), hi + 0.2 * (hi - lo + 0.1))
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=7)
    return _save(fig, target)


def _plot_overhead(summary: dict, target: Path) -> Path | None:
    names = [n for n in summary if "time/step" in summary[n]]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 4.5))
    bottom = [0.0] * len(names)

    def mean(name: str, key: str) -> float:
        return summary[name].get(key, {}).get("mean", 0.0)

    # runs logged before time/forward existed show their whole feature time as "features"
    split = {
        "pool forward": [mean(n, "time/forward") for n in names],
        "features (beyond the forward)": [mean(n, "time/features") - mean(n, "time/forward") for n in names],
        "solver": [mean(n, "time/solver") for n in names],
        "train step": [mean(n, "time/train") for n in names],
        "reweighting": [mean(n, "time/reweight") for n in names],
    }
    for label, vals in split.items():
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per step")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    for lab in ax.get_xticklabels():
        lab.set_ha("right")
    ax.legend(fontsize=7)
    return _save(fig, target)


def _plot_conflicts(summary: dict, target: Path) -> Path | None:
    names = [n for n in summary if "conflicts" in summary[n] and "conflicts_random" in summary[n]]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names)), 4))
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [summary[n]["conflicts"]["mean"] for n in names],
        0.4,
        yerr=[summary[n]["conflicts"]["std"] for n in names],
        capsize=2,
        label="selected batch",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [summary[n]["conflicts_random"]["mean"] for n in names],
        0.4,
        yerr=[summary[n]["conflicts_random"]["std"] for n in names],
        capsize=2,
        label="random batch, same pool",
    )
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("conflicting pairs per step (of 120)")
    ax.legend(fontsize=7)
    return _save(fig, target)


def _plot_domains(summary: dict, target: Path) -> Path | None:
    names = [n for n in summary if summary[n].get("per_domain_val")]
    if not names:
        return None
    domains = sorted({d for n in names for d in summary[n]["per_domain_val"]})
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(domains) * max(1, len(names) / 4)), 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(
            [d + (i - (len(names) - 1) / 2) * width for d in range(len(domains))],
            [summary[n]["per_domain_val"].get(dom, float("nan")) for dom in domains],
            width,
            label=n,
        )
    ax.set_xticks(range(len(domains)), domains, rotation=20, fontsize=8)
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=6, ncol=3)
    return _save(fig, target)


def plot_experiment(folder: Path) -> list[Path]:
    """All plots of one experiment folder (needs its ``summary.json``)."""
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        return []
    summary = json.loads(summary_path.read_text())
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    runs = _runs(folder, summary)
    written = [
        _plot_curves(
            runs, "val/loss_mean", f"{folder.name}: validation loss (mean over domains)", plots / "val_loss_mean.png"
        ),
        _plot_curves(
            runs, "val/loss_worst", f"{folder.name}: validation loss (worst domain)", plots / "val_loss_worst.png"
        ),
        _plot_curves(
            runs,
            "val/loss_mean",
            f"{folder.name}: validation loss against training time",
            plots / "val_loss_time.png",
            x="seconds",
        ),
        _plot_final(summary, plots / "final_loss.png"),
        _plot_overhead(summary, plots / "overhead.png"),
        _plot_conflicts(summary, plots / "conflicts.png"),
        _plot_domains(summary, plots / "per_domain.png"),
    ]
    for run, seeds in runs.items():
        rows = seeds[0] if seeds else []
        keys = {k for r in rows for k in r if k.startswith("weights/")}
        if any(len({round(r[k], 6) for r in rows if k in r}) > 1 for k in keys):
            written.append(plot_weights(folder / run / "seed0", plots / f"weights_{run}.png"))
    return [p for p in written if p is not None]


def plot_all(results: Path) -> list[Path]:
    """Plots of every experiment folder under ``results``."""
    written = []
    for folder in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        written += plot_experiment(folder)
    return written


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "experiments"
    for path in plot_all(root):
        print(path)
