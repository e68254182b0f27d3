"""Metric loggers: JSONL always; TensorBoard and Weights & Biases optional (imported lazily).

``train.report_to`` names the optional ones (``mixsel train``); :func:`build_loggers` builds them:

* ``metrics.jsonl`` in the run folder, always (every plot and ``mixsel compare`` read it);
* ``tensorboard``: event files under ``<run>/tb`` (``pip install mixsel[log]``), tags as logged
  (``train/loss``, ``select/frac/<domain>``, ``weights/<domain>``...);
* ``wandb``: a Weights & Biases run under ``<run>/wandb``, **offline** unless an API key is set
  (``WANDB_API_KEY``) or ``WANDB_MODE`` says otherwise; sync it later with ``wandb sync``.

:func:`launch_message` is the one line every loop (``mixsel train``, ``SelectionTrainer``,
``SelectionSFTTrainer``) logs at start: the world size, the backend and what each rank selects.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from mixsel.errors import ConfigError

__all__ = [
    "LOGGERS",
    "JsonlLogger",
    "MetricLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "check_report_to",
    "check_world",
    "launch_message",
    "progress_postfix",
    "truncate_jsonl",
]

#: names accepted by ``train.report_to`` (``jsonl`` is always on; ``none`` adds nothing)
LOGGERS = ("jsonl", "tensorboard", "wandb", "none")


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return _clean(value.item())
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` (booleans, strings and lists dropped)."""
    out = {}
    for key, value in metrics.items():
        value = _clean(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def truncate_jsonl(path: str | Path, truncate_from: int) -> None:
    """Drop the lines of a ``{"step": s, ...}`` JSONL file with ``s >= truncate_from`` (and unreadable
    ones), so a resumed run does not duplicate steps and a fresh one (``truncate_from=0``) starts empty."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) < truncate_from:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in kept))


class JsonlLogger:
    """Appends one JSON object per ``log`` call to ``path`` (``{"step": s, ...metrics}``).

    On resume, lines with ``step >= truncate_from`` are dropped first so the file has no duplicates.
    """

    def __init__(self, path: str | Path, truncate_from: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_from is not None:
            truncate_jsonl(self.path, truncate_from)
        self._fh = self.path.open("a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir`` (``pip install mixsel[log]``); tags as logged."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"train.report_to has tensorboard but it is not installed ({err}); pip install 'mixsel[log]'"
            ) from None
        self.writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Scalars to a Weights & Biases run (``pip install wandb``), offline when no API key is set.

    Args:
        output_dir: the run folder; W&B writes its files under ``<output_dir>/wandb``.
        name: the run name shown in W&B (``ExperimentConfig.name``).
        config: the resolved experiment config, stored with the run.
        project: the W&B project (``WANDB_PROJECT`` when set, else ``"mixsel"``).
    """

    def __init__(
        self, output_dir: str | Path, name: str, config: dict[str, Any] | None = None, project: str | None = None
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("train.report_to has wandb but it is not installed; pip install wandb") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.mode = mode
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT", "mixsel"),
            name=name,
            dir=str(output_dir),
            config=config or {},
            mode=mode,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


# the package each optional logger imports, and how to install it
_NEEDS = {"tensorboard": ("tensorboard", "pip install 'mixsel[log]'"), "wandb": ("wandb", "pip install wandb")}


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(names: list[str]) -> None:
    """Raise a one-line ``ValueError`` for a name that is not a known logger, or whose package is not
    installed, at the start of a run rather than when the run folder is opened."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"train.report_to has unknown logger(s) {unknown}; valid: {list(LOGGERS)}")
    for name in dict.fromkeys(names):
        if name in _NEEDS and not _installed(_NEEDS[name][0]):
            package, fix = _NEEDS[name]
            raise ConfigError(
                f"train.report_to has {name} but {package} is not installed: {fix}, or drop {name} from "
                "train.report_to (metrics.jsonl is always written)"
            )


def build_loggers(
    output_dir: str | Path,
    names: list[str],
    truncate_from: int | None = None,
    *,
    run_name: str = "mixsel",
    config: dict[str, Any] | None = None,
) -> list[MetricLogger]:
    """``metrics.jsonl`` plus the loggers in ``names`` (``train.report_to``).

    Args:
        output_dir: the run folder.
        names: ``tensorboard``, ``wandb`` (``jsonl`` and ``none`` add nothing).
        truncate_from: drop ``metrics.jsonl`` lines from this step on (resume; 0 = start empty).
        run_name: the W&B run name.
        config: the resolved config, stored with the W&B run.
    """
    check_report_to(names)
    loggers: list[MetricLogger] = [JsonlLogger(Path(output_dir) / "metrics.jsonl", truncate_from)]
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(Path(output_dir) / "tb"))
        elif name == "wandb":
            loggers.append(WandbLogger(output_dir, run_name, config))
    return loggers


_MODES = {
    "global": "every rank computes the features of the whole pool and makes the same selection, then trains on "
    "its share",
    "gather": "each rank computes the features of its shard of the pool; they are all-gathered, every rank makes "
    "the same selection and trains on its own picks",
    "local": "each rank selects from its own pool (shard)",
}


def launch_message(
    who: str,
    *,
    world_size: int,
    backend: str,
    mode: str,
    selector: str,
    batch: int,
    pool: int,
    rank: int = 0,
    per_rank: bool = False,
) -> str:
    """The line a training loop logs at start: world size, backend and what each rank selects.

    Args:
        who: the loop (``"mixsel train"``, ``"SelectionTrainer"``...).
        world_size: number of processes.
        backend: the ``torch.distributed`` backend (``gloo``, ``nccl``); ignored for one process.
        mode: ``global``, ``gather`` or ``local`` (``train.distributed_selection``; the Trainers select locally).
        selector: the selector name.
        batch: selected rows per step (per rank with ``per_rank``).
        pool: candidates per step (per rank with ``per_rank``).
        rank: this process's rank.
        per_rank: ``batch`` and ``pool`` are per rank (the Trainers' per-device sizes).
    """
    scope = "per rank" if per_rank else "per step"
    if world_size <= 1:
        return f"{who}: world size 1 (one process); {selector} selects {batch} of a pool of {pool} {scope}"
    how = _MODES.get(mode, mode)
    return (
        f"{who}: world size {world_size} ({backend}), rank {rank}; {selector} selects {batch} of a pool of {pool} "
        f"{scope}; selection {mode!r}: {how}"
    )


def progress_postfix(metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix: training loss, seconds per step and the share spent selecting."""
    out = {}
    if isinstance(metrics.get("train/loss"), (int, float)):
        out["loss"] = f"{metrics['train/loss']:.3f}"
    step = metrics.get("time/step")
    if isinstance(step, (int, float)) and step > 0:
        out["s/step"] = f"{step:.2f}"
        select = metrics.get("time/select")
        if isinstance(select, (int, float)):
            out["select"] = f"{select:.2f}s ({100 * select / step:.0f}%)"
    return out


def check_world(world_size: int) -> None:
    """Raise when a launcher started several processes but this one trains alone (a silent no-op launch).

    ``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``; a Trainer on CPU whose arguments do not
    ask for the CPU (``use_cpu=True``, or ``ACCELERATE_USE_CPU=true``) sees no backend and runs each
    process as its own world of size 1.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world_size == 1:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={launched} processes but this trainer runs as 1 process, so each "
            "would train alone: on CPU pass use_cpu=True in the training arguments (or set ACCELERATE_USE_CPU=true)"
        )
