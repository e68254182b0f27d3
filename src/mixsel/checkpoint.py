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
    "free_bytes",
    "load_checkpoint",
    "read_manifest",
    "remove_leftovers",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "size_text",
    "space_note",
    "state_bytes",
    "write_failure",
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
    """What is left after a failed save and how to go on (``--resume``, or ``--overwrite`` without a
    checkpoint), for error messages."""
    manifest = read_manifest(output_dir / CHECKPOINT_NAME)
    if manifest is None:
        return (
            "there is no earlier checkpoint: free some space (or fix the folder), then start the run again with "
            "--overwrite"
        )
    return (
        f"the previous checkpoint (step {manifest.get('step')}) in {output_dir / CHECKPOINT_NAME} is intact: free some "
        "space (or fix the folder), then continue with --resume"
    )


def state_bytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj`` (nested dicts, lists and tuples), each storage counted once:
    about what ``torch.save(obj)`` writes."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def size_text(nbytes: float) -> str:
    """``"1.4 GB"``, ``"312 MB"``, ``"18 KB"``: a size in decimal units, for messages."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"


# errnos of a full disk or an exhausted quota
_FULL = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}
# how libraries word a failed write without an errno: torch.save's PytorchStreamWriter ("file write
# failed", "[enforce fail at inline_container.cc] . unexpected pos", "basic_ios::clear: iostream error")
# and safetensors' SafetensorError ("I/O error: No space left on device (os error 28)")
_FULL_WORDS = {
    "no space left on device": "no space left on device",
    "(os error 28)": "no space left on device",
    "storagefull": "no space left on device",
    "disk quota exceeded": "disk quota exceeded",
    "(os error 122)": "disk quota exceeded",
    "quotaexceeded": "disk quota exceeded",
}
_WRITE_WORDS = ("file write failed", "unexpected pos", "iostream error", "i/o error", "ioerror")


def write_failure(err: BaseException, free: int | None = None, needed: int = 0) -> str | None:
    """Why a write failed, when ``err`` (or an exception it was raised from) is a failed write.

    ``torch.save`` reports a full disk as a ``RuntimeError`` and safetensors as a ``SafetensorError``,
    neither an ``OSError``; their messages are recognised here.

    Args:
        err: the exception.
        free: the bytes free before the write (:func:`free_bytes`): a failure without an errno counts as
            a full disk when they were fewer than ``needed``.
        needed: the bytes the write needed (0: unknown).

    Returns:
        ``"no space left on device"``, ``"disk quota exceeded"``, the OS's words (``"Permission
        denied"``) or ``"a write failed"``; ``None`` when ``err`` is not a failed write (a bug, a value).
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return _FULL.get(current.errno or 0) or current.strerror or str(current) or "a write failed"
        text = str(current).lower()
        for words, reason in _FULL_WORDS.items():
            if words in text:
                return reason
        if any(words in text for words in _WRITE_WORDS):
            if free is not None and needed and free < needed:
                return "no space left on device"
            return "a write failed"
        current = current.__cause__ or current.__context__
    return None


def free_bytes(folder: str | Path) -> int:
    """The bytes free for this user on the file system of ``folder`` (or of its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:  # pragma: no cover - a folder that vanished
        return 0


def space_note(folder: str | Path, needed: int, free: int, what: str) -> str:
    """``"<what> needs about 1.2 GB and 310 MB were free in <folder>"``, for full-disk messages.

    ``free`` is measured before the write: after a failed one the disk is full, and a file that a
    library still holds open keeps its space until it is closed.
    """
    return f"{what} needs about {size_text(needed)} and {size_text(free)} were free in {folder}"


def save_checkpoint(output_dir: str | Path, state: dict[str, Any], *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as the run's latest checkpoint, keeping the one before as ``checkpoint.prev``.

    Args:
        output_dir: the run folder.
        state: plain containers of tensors and numbers (loadable with ``weights_only=True``).
        meta: small JSON-able facts written to ``manifest.json`` as well (e.g. the fingerprint).

    Returns:
        The ``checkpoint`` folder.

    Raises:
        OSError: the disk is full or the folder is not writable (also when ``torch.save`` says so with a
            ``RuntimeError``); one line naming the folder, the bytes needed and free, and that the
            previous checkpoint is intact (nothing of it was touched); ``.checkpoint.tmp`` is removed.
    """
    output_dir = Path(output_dir)
    final, previous, tmp = output_dir / CHECKPOINT_NAME, output_dir / PREVIOUS_NAME, output_dir / TMP_NAME
    step = state.get("step")
    free = free_bytes(output_dir)
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
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        needed = state_bytes(state)
        what = write_failure(err, free, needed)
        if what is None:  # not a failed write: a bug, reported as one
            raise
        raise OSError(
            f"could not write the step-{step} checkpoint ({what}; {space_note(output_dir, needed, free, 'it')}); "
            f"{_describe(output_dir)}"
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
