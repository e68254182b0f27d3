"""Metric loggers: JSONL always; TensorBoard optional (imported lazily)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

__all__ = ["JsonlLogger", "MetricLogger", "TensorBoardLogger", "build_loggers", "truncate_jsonl"]


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
    """Scalars to TensorBoard (``pip install mixsel[log]``)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _clean(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def build_loggers(output_dir: str | Path, names: list[str], truncate_from: int | None = None) -> list[MetricLogger]:
    loggers: list[MetricLogger] = [JsonlLogger(Path(output_dir) / "metrics.jsonl", truncate_from)]
    for name in names:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(Path(output_dir) / "tb"))
        elif name not in ("jsonl", "none"):
            raise ValueError(f"unknown logger {name!r}; use jsonl or tensorboard")
    return loggers
