"""Plots that read run folders only (``metrics.jsonl``); needs matplotlib (``mixsel[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_compare", "plot_weights", "read_metrics"]


def read_metrics(run_dir: str | Path) -> list[dict]:
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


def plot_compare(output_dir: str | Path, runs: list[str], seeds: list[int]) -> list[Path]:
    """Validation loss (mean and worst domain), train loss and conflicts over steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in [
        ("val/loss_mean", "validation loss (mean over domains)"),
        ("val/loss_worst", "validation loss (worst domain)"),
        ("train/loss", "training loss of the selected batch"),
        ("select/conflicts", "conflicting gradient pairs in the selected batch"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for name in runs:
            for seed in seeds:
                xs, ys = _series(read_metrics(output_dir / name / f"seed{seed}"), key)
                if xs:
                    ax.plot(xs, ys, label=name if seed == seeds[0] else None, alpha=0.9)
                    drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.legend(fontsize=7)
            fig.tight_layout()
            target = plots / (key.replace("/", "_") + ".png")
            fig.savefig(target, dpi=110)
            written.append(target)
        plt.close(fig)
    return written


def plot_weights(run_dir: str | Path, target: str | Path | None = None) -> Path | None:
    """Domain weights (``weights/<domain>``) over steps of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = sorted({k for row in rows for k in row if k.startswith("weights/")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot(*_series(rows, key), label=key.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("domain weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    target = Path(target or Path(run_dir) / "weights.png")
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
