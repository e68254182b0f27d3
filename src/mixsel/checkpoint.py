"""Atomic, verified checkpoints of everything a run needs to resume exactly.

A run folder holds up to two checkpoints, each a folder with ``state.pt`` (model and optimizer
state, LR schedule, sampler, selector and reweighter state, RNG states, step, the config
fingerprint) and ``manifest.json`` (step, fingerprint, and the size and SHA-256 of every file)::

    checkpoint/         the latest
    checkpoint.prev/    the one before it, the fallback when the latest is damaged
    .checkpoint.tmp/    a save in progress; a crash mid-save leaves it, and the next start removes it

A save writes ``.checkpoint.tmp/`` in full (fsync'd, checksums computed from the bytes on disk), and
only then rotates ``checkpoint/`` to ``checkpoint.prev/`` and the new folder to ``checkpoint/`` with
``os.replace``: a crash (or a full disk) at any point leaves at least one complete checkpoint. A load
verifies the checksums and reads ``state.pt`` with ``torch.load(weights_only=True)`` (tensors and
plain containers only, never pickled code); a damaged checkpoint is skipped with a warning in favour
of the previous one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixsel.errors import DataError

__all__ = [
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "TMP_NAME",
    "load_checkpoint",
    "read_manifest",
    "remove_leftovers",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint"
PREVIOUS_NAME = "checkpoint.prev"
TMP_NAME = ".checkpoint.tmp"
_LEGACY_OLD = ".checkpoint.old"  # the swap folder of mixsel <= 0.1 (no manifest: never loaded)
_MANIFEST = "manifest.json"
_STATE = "state.pt"
FORMAT = 1


def rng_state() -> dict[str, Any]:
    """The torch, Python ``random``, numpy (and CUDA) generator states, as plain tensors and lists."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - folders cannot be fsync'd on some platforms
        pass
    finally:
        os.close(fd)


def _describe(output_dir: Path) -> str:
    """``"the previous checkpoint (step 4)"`` or ``"no earlier checkpoint"``, for error messages."""
    manifest = read_manifest(output_dir / CHECKPOINT_NAME)
    if manifest is None:
        return "there is no earlier checkpoint"
    return f"the previous checkpoint (step {manifest.get('step')}) in {output_dir / CHECKPOINT_NAME} is intact"


def save_checkpoint(output_dir: str | Path, state: dict[str, Any], *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as the run's latest checkpoint, keeping the one before as ``checkpoint.prev``.

    Args:
        output_dir: the run folder.
        state: plain containers of tensors and numbers (loadable with ``weights_only=True``).
        meta: small JSON-able facts written to ``manifest.json`` as well (e.g. the fingerprint).

    Returns:
        The ``checkpoint`` folder.

    Raises:
        OSError: the disk is full or the folder is not writable; the message says so and that the
            previous checkpoint is intact (nothing of it was touched).
    """
    output_dir = Path(output_dir)
    final, previous, tmp = output_dir / CHECKPOINT_NAME, output_dir / PREVIOUS_NAME, output_dir / TMP_NAME
    step = state.get("step")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / _STATE)
        _fsync(tmp / _STATE)
        manifest = {
            "format": FORMAT,
            "step": step,
            **(meta or {}),
            "files": {_STATE: {"bytes": (tmp / _STATE).stat().st_size, "sha256": _sha256(tmp / _STATE)}},
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / _MANIFEST)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise OSError(
            f"could not write the step-{step} checkpoint to {tmp} ({what}); {_describe(output_dir)}: "
            "free some space (or fix the folder), then continue with --resume"
        ) from err
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync(output_dir)
    shutil.rmtree(output_dir / _LEGACY_OLD, ignore_errors=True)
    return final


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a checkpoint folder (unverified), or ``None`` if absent or unreadable."""
    try:
        manifest = json.loads((Path(folder) / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class _Damaged(Exception):
    """A checkpoint folder that fails verification (the message says how)."""


def _load_verified(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise _Damaged(f"{folder} has no readable {_MANIFEST} (an interrupted save, or an older mixsel)")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise _Damaged(f"{path} is missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise _Damaged(f"{path} has {size} bytes, not the {expected.get('bytes')} it was saved with (truncated)")
        if _sha256(path) != expected.get("sha256"):
            raise _Damaged(f"{path} fails its SHA-256 checksum (corrupted on disk)")
    try:
        state = torch.load(folder / _STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for unreadable files
        raise _Damaged(f"{folder / _STATE} cannot be read ({type(err).__name__})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise _Damaged(f"{folder / _STATE} is not a mixsel checkpoint")
    return state


def load_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The newest intact checkpoint's state, or ``None`` when the run folder holds no checkpoint.

    A damaged latest checkpoint (bad checksum, truncated, unreadable) is skipped with a warning and
    the previous one is loaded.

    Raises:
        ValueError: checkpoints exist but none is intact (each problem is named).
    """
    output_dir = Path(output_dir)
    problems: list[str] = []
    for folder in (output_dir / CHECKPOINT_NAME, output_dir / PREVIOUS_NAME):
        if not folder.exists():
            continue
        try:
            state = _load_verified(folder)
        except _Damaged as err:
            problems.append(str(err))
            continue
        if problems or folder.name == PREVIOUS_NAME:
            why = "; ".join(problems) or f"{output_dir / CHECKPOINT_NAME} is missing (a save was interrupted)"
            log.warning("%s: resuming from the previous checkpoint (step %s) instead", why, state["step"])
        return state
    if problems:
        raise DataError(
            f"no intact checkpoint in {output_dir}: {'; '.join(problems)}; "
            "start the run afresh with --overwrite (or restore the folder from a backup)"
        )
    return None


def remove_leftovers(output_dir: str | Path) -> None:
    """Remove the folder of an interrupted save (``.checkpoint.tmp``); resumes read ``checkpoint/`` or
    ``checkpoint.prev/``, which a crash mid-save never touches."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(Path(output_dir) / TMP_NAME)
