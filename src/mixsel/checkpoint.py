"""Atomic checkpoints of everything a run needs to resume exactly.

A checkpoint is one folder ``<output_dir>/checkpoint`` holding ``state.pt`` (model and optimizer
state, LR schedule, sampler, selector and reweighter state, RNG states, step). It is written to a
temporary sibling folder first and then swapped in with ``os.replace``, so a crash mid-save never
leaves a half-written checkpoint: either the old one or the new one is there.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

CHECKPOINT_NAME = "checkpoint"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``output_dir/checkpoint/state.pt``; returns the folder."""
    output_dir = Path(output_dir)
    final = output_dir / CHECKPOINT_NAME
    tmp = output_dir / f".{CHECKPOINT_NAME}.tmp"
    old = output_dir / f".{CHECKPOINT_NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as fh:
        os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or ``None`` if there is none.

    If a crash happened between the two renames, the previous checkpoint is recovered from
    ``.checkpoint.old``.
    """
    output_dir = Path(output_dir)
    for folder in (output_dir / CHECKPOINT_NAME, output_dir / f".{CHECKPOINT_NAME}.old"):
        path = folder / "state.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=False)
    return None
