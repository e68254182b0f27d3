"""Run folders: never overwritten by accident, used by one run at a time, resumed only by the run that wrote them.

A run folder holds the files of one run (:data:`RUN_FILES`), a marker (:data:`MARKER_NAME`) and, while a
run uses it, a lock file (:data:`LOCK_NAME`). Before anything else is written:

* :func:`check_output_dir` refuses a path that cannot be a run folder (a file, a folder under a file,
  a name too long for the file system, a folder that is not writable);
* :func:`plan_run_folder` takes the folder's lock (:func:`lock_run_folder`: an OS advisory lock held
  for the run's life, so a second run, ``--resume`` or ``--overwrite`` of a folder in use is refused
  naming the holder), refuses a folder that holds another run unless the run resumes it (``--resume``)
  or replaces it (``--overwrite``), refuses a folder that is not a mixsel run even then (no marker, and
  no ``config.yaml`` and ``metrics.jsonl`` that mixsel wrote), and refuses ``--resume`` when there is
  no checkpoint;
* :func:`check_resume` compares the checkpoint's config fingerprint with this run's config and
  refuses a changed field that alters the run (``mixsel.config.RESUME_SAFE_FIELDS`` lists the ones
  that do not), a change of the training data (:func:`data_fingerprint`), and a hand edit of
  ``<run>/config.yaml`` that this run would discard, unless ``--force-resume``.

Once the run has written ``config.yaml``, :func:`record_run` writes the marker (the mixsel version, the
names mixsel writes, the SHA-256 and content of ``config.yaml`` as written) and returns the data
fingerprint its checkpoints carry. ``--overwrite`` (:func:`clear_run`) deletes only what the marker
lists, in ``plots/`` only mixsel's figures; a hand-edited ``config.yaml`` is kept as
``config.yaml.edited``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO, Any

from mixsel.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
from mixsel.config import ExperimentConfig, config_diff, config_to_dict, describe_diff, run_fields
from mixsel.errors import ConfigError, MixselError

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "RUN_FILES",
    "check_output_dir",
    "check_resume",
    "clear_run",
    "data_fingerprint",
    "lock_run_folder",
    "plan_run_folder",
    "record_run",
    "release_run_folder",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".mixsel.lock"  # holds the OS lock of the run using the folder, and that run's pid, host and start
MARKER_NAME = ".mixsel-run.json"  # "a mixsel run": the version, the names mixsel writes, config.yaml as written
EDITED_NAME = "config.yaml.edited"  # a hand-edited config.yaml, kept (never deleted by mixsel)
_BOOKKEEPING = frozenset({LOCK_NAME, MARKER_NAME})
# mixsel's figures in <run>/plots (mixsel.plots.plot_run); other files there are the user's
PLOT_FILES = frozenset({"loss.png", "domain_loss.png", "weights.png", "composition.png"})
_RESUME_FLAGS = ("train.resume", "train.overwrite", "train.force_resume")

# every name a run writes into its folder; --overwrite deletes these and nothing else
RUN_FILES = frozenset(
    {
        "config.yaml",
        ".config.yaml.tmp",
        "metrics.jsonl",
        "result.json",
        ".result.json.tmp",
        "selections.jsonl",
        "generations.jsonl",
        ".generations.jsonl.tmp",
        CHECKPOINT_NAME,
        PREVIOUS_NAME,
        ".checkpoint.tmp",
        ".checkpoint.old",
        "final",
        "plots",
        "tb",
        "wandb",
        MARKER_NAME + ".tmp",
    }
)


def _limits(folder: Path) -> tuple[int, int]:
    """(longest file name, longest path) in bytes on the file system of ``folder``."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - non-POSIX
        return 255, 4096


def check_output_dir(path: str | Path, field: str = "train.output_dir") -> None:
    """Raise one clear line if ``path`` cannot hold a run folder; writes nothing that stays.

    Writability is probed by creating and removing a temporary folder (``os.access`` would say yes
    to root on a read-only mount).

    Raises:
        ValueError: ``path`` is a file, lies under a file, is too long, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{field}={str(out)!r} is a file, not a folder; choose a folder path")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{field}={str(out)!r} lies under {str(ancestor)!r}, which is a file; choose a folder path")
    name_max, path_max = _limits(ancestor)
    too_long = [part for part in out.parts if len(os.fsencode(part)) > name_max]
    size = len(os.fsencode(str(out.absolute())))
    if too_long or size >= path_max:
        raise ConfigError(
            f"{field} is too long for the file system (a name may have {name_max} bytes, a path {path_max}; "
            f"this path has {size}): choose a shorter path"
        )
    try:
        with tempfile.TemporaryDirectory(dir=ancestor, prefix=".mixsel-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}={str(out)!r} is not writable ({err.strerror or err} in {str(ancestor)!r}); "
            "choose a folder you can write to"
        ) from None


# ---- the run-folder lock ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Held:
    """A run-folder lock this process holds."""

    file: IO[bytes] | None  # None: the file system cannot lock (a warning said so)
    path: Path  # the lock file
    created: Path | None  # the topmost folder made to hold the lock: removed again if the run never opened it
    previous: bytes | None  # a stale lock file's content, put back if the run never opened the folder
    opened: bool = False  # record_run ran: the folder is this run's now
    owners: dict[int, Any] = dataclasses.field(default_factory=dict)  # id(owner) -> its weakref.finalize
    pid: int = dataclasses.field(default_factory=os.getpid)  # a forked child never releases its parent's lock


_HELD: dict[str, _Held] = {}


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun job, or a single process: the one that locks and writes the run folder."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def _key(out: Path) -> str:
    return str(out.absolute().resolve())


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _holder(raw: bytes) -> str:
    """``pid 123@host, since 2026-01-01 10:00:00 UTC`` from a lock file's content."""
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']}@{info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet" if not raw.strip() else "a process of unknown pid"


def _read_holder(path: Path) -> str:
    """Who holds the lock file ``path`` (read again for a moment: the holder writes its pid just after locking)."""
    raw = b""
    for _ in range(20):
        with contextlib.suppress(OSError):
            raw = path.read_bytes()
        if raw.strip():
            break
        time.sleep(0.025)
    return _holder(raw)


def _remove_empty(folder: Path, top: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (the folders a lock created)."""
    if top is None:
        return
    folder = folder.absolute()
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top or folder.parent == folder:
            return
        folder = folder.parent


def _in_use(out: Path, path: Path) -> ConfigError:
    return ConfigError(
        f"train.output_dir={str(out)!r} is in use by another mixsel run ({_read_holder(path)}): wait for it to "
        "end (or stop it), or choose another train.output_dir"
    )


def _acquire(out: Path) -> _Held:
    """Create ``out`` if missing and lock ``out/.mixsel.lock`` without waiting; write this process's pid in it."""
    import fcntl

    missing = [p for p in (out.absolute(), *out.absolute().parents) if not p.exists()]
    top = missing[-1] if missing else None
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    for _ in range(5):
        file = open(path, "a+b")  # noqa: SIM115 - held for the run's life; "a": never truncates another's pid
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            file.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                _remove_empty(out, top)
                raise _in_use(out, path) from None
            log.warning(
                "cannot lock %s (%s): two runs started on this folder at once are not kept apart",
                path,
                err.strerror or err,
            )
            return _Held(None, path, top, None)
        try:  # the lock of a file its holder removed (released) in between protects nothing: lock the new one
            same = os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        file.close()
    else:  # pragma: no cover - five releases in a row while this process tried to lock
        raise _in_use(out, path)
    file.seek(0)
    previous = file.read()
    if previous.strip():
        log.warning(
            "%s: taking over the lock of %s, which ended without releasing it (killed or crashed)",
            path,
            _holder(previous),
        )
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    file.seek(0)
    file.truncate()
    file.write(json.dumps(info).encode() + b"\n")
    file.flush()
    return _Held(file, path, top, previous if previous.strip() else None)


def _release(key: str) -> None:
    """Release the lock held under ``key``: remove the lock file, or, when the run never opened the
    folder (refused or failed before), put the folder back as it was (a stale lock file's content, no
    folder that the lock created)."""
    held = _HELD.pop(key, None)
    if held is None or held.pid != os.getpid():
        return
    for finalizer in list(held.owners.values()):
        finalizer.detach()
    with contextlib.suppress(OSError):
        if not held.opened and held.previous is not None:
            held.path.write_bytes(held.previous)
        else:
            held.path.unlink()
    if held.file is not None:
        held.file.close()  # the kernel drops the lock
    if not held.opened:
        _remove_empty(held.path.parent, held.created)


def _drop(key: str, owner: int) -> None:
    """An owner of the lock under ``key`` is gone (collected, or refused): release the lock with the last one."""
    held = _HELD.get(key)
    if held is None:
        return
    held.owners.pop(owner, None)
    if not held.owners:
        _release(key)


def _disown(out: Path, owner: object) -> None:
    held = _HELD.get(_key(out))
    finalizer = held.owners.get(id(owner)) if held is not None else None
    if finalizer is not None:
        finalizer()  # calls _drop now, once


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _release(key)


def lock_run_folder(output_dir: str | Path, owner: object | None = None) -> bool:
    """Take the lock of run folder ``output_dir`` for this process; returns whether this call took it.

    ``<output_dir>/.mixsel.lock`` (the folder is created if missing) is locked with ``fcntl.flock`` and
    holds this process's pid, host and start time. The kernel drops the lock when the process ends,
    however it ends, so a lock file whose lock is free is stale (its run was killed): it is taken over
    with a warning naming the old holder. Only rank 0 of a torchrun job locks (other ranks return
    ``False``); a process that holds the lock already may take it again (it is counted per ``owner``).

    The lock is held until :func:`release_run_folder`, until every ``owner`` (``mixsel train`` passes
    the run's config) has been garbage collected, or until the process exits. Then the lock file is
    removed; a run that never opened the folder (:func:`record_run`) leaves it as it found it (no folder
    the lock created, a stale lock file's content put back).

    Raises:
        ConfigError: another process holds the lock (its pid, host and start are named).
    """
    if not _is_main_rank():
        return False
    out = Path(output_dir)
    key = _key(out)
    held = _HELD.get(key)
    took = held is None
    if held is None:
        held = _HELD[key] = _acquire(out)
    if owner is not None and id(owner) not in held.owners:
        with contextlib.suppress(TypeError):  # an owner that takes no weak reference: held until released or exit
            held.owners[id(owner)] = weakref.finalize(owner, _drop, key, id(owner))
    return took


def release_run_folder(output_dir: str | Path) -> None:
    """Release this process's lock of run folder ``output_dir`` now (see :func:`lock_run_folder`); no-op if not held."""
    _release(_key(Path(output_dir)))


# ---- what a folder holds ------------------------------------------------------------------------------------------


def _entries(out: Path) -> list[str]:
    """The names in ``out`` other than the lock and the marker (none if ``out`` is not a folder)."""
    return sorted(name for name in os.listdir(out) if name not in _BOOKKEEPING) if out.is_dir() else []


def _is_backup(name: str) -> bool:
    return name == EDITED_NAME or name.startswith(EDITED_NAME + ".")


def _read_marker(out: Path) -> dict[str, Any] | None:
    """The run marker of ``out`` (see :func:`record_run`), or ``None`` when there is none or it is unreadable."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def _mixsel_wrote(text: str) -> bool:
    """Whether ``text`` is a ``config.yaml`` exactly as mixsel writes it (every section of an experiment,
    in ``save_config``'s form): a comment or a hand edit makes it the user's file."""
    import yaml

    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    sections = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return isinstance(tree, dict) and set(tree) == sections and yaml.safe_dump(tree, sort_keys=False) == text


def _legacy_run(out: Path) -> bool:
    """A run written by a mixsel without markers: ``metrics.jsonl`` and a ``config.yaml`` that mixsel wrote."""
    try:
        text = (out / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return (out / "metrics.jsonl").is_file() and _mixsel_wrote(text)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _not_a_run(out: Path, entries: list[str]) -> ConfigError:
    return ConfigError(
        f"train.output_dir={str(out)!r} is not a mixsel run (no {MARKER_NAME}, and no config.yaml and metrics.jsonl "
        f"that mixsel wrote) but holds {_listing(entries)}; mixsel never empties such a folder, even with "
        "--overwrite: choose another train.output_dir (e.g. train.output_dir=runs/<name>)"
    )


def plan_run_folder(cfg: ExperimentConfig) -> str:
    """Lock ``cfg.train.output_dir`` and decide how this run may use it: ``"fresh"``, ``"overwrite"`` or ``"resume"``.

    The lock (:func:`lock_run_folder`, owned by ``cfg``) is taken before the folder is looked at, and
    released again when this refuses.

    Raises:
        ValueError: the folder cannot hold a run (see :func:`check_output_dir`); another run holds its
            lock; it holds another run and neither ``train.resume`` nor ``train.overwrite`` is set; it
            holds files that are not a run's, or is not a mixsel run (even with ``--overwrite``); or
            ``train.resume`` is set and there is no checkpoint.
    """
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    lock_run_folder(out, owner=cfg)
    try:
        return _plan(out, cfg)
    except MixselError:
        _disown(out, cfg)
        raise


def _plan(out: Path, cfg: ExperimentConfig) -> str:
    entries = _entries(out)
    if cfg.train.resume:
        if not any((out / name).is_dir() for name in (CHECKPOINT_NAME, PREVIOUS_NAME)):
            finished = (
                " (it holds a finished run, saved without checkpoints: train.save_every=0)"
                if (out / "result.json").exists()
                else ""
            )
            raise ConfigError(
                f"--resume: {str(out)!r} holds no checkpoint to continue{finished}; run without --resume to "
                "start afresh (add --overwrite to replace what is there)"
            )
        return "resume"
    if not entries:
        return "fresh"
    foreign = [name for name in entries if name not in RUN_FILES and not _is_backup(name)]
    if foreign:
        raise ConfigError(
            f"train.output_dir={str(out)!r} holds files that are not a mixsel run's ({_listing(foreign)}); "
            "choose an empty or new folder (e.g. train.output_dir=runs/<name>)"
        )
    if _read_marker(out) is None and not _legacy_run(out):
        raise _not_a_run(out, entries)
    if not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds a run ({_listing(entries)}): continue it with --resume, "
            "replace it with --overwrite, or choose another folder"
        )
    return "overwrite"


def _backup_config(path: Path) -> Path:
    """Copy a hand-edited ``config.yaml`` to ``config.yaml.edited`` (``.1``, ``.2``... if taken by another file)."""
    raw = path.read_bytes()
    n = 0
    while True:
        target = path.with_name(EDITED_NAME if n == 0 else f"{EDITED_NAME}.{n}")
        if not target.exists():
            shutil.copy2(path, target)
            return target
        if target.is_file() and target.read_bytes() == raw:
            return target
        n += 1


def _config_edited(out: Path, marker: dict[str, Any]) -> bool:
    """Whether ``out/config.yaml`` differs from the one mixsel wrote (the marker's hash)."""
    try:
        raw = (out / "config.yaml").read_bytes()
    except OSError:
        return False
    return bool(marker.get("config_sha256")) and _sha256(raw) != marker["config_sha256"]


def _clear_plots(folder: Path) -> None:
    """Delete mixsel's figures from ``folder`` (``<run>/plots``), and the folder once it is empty."""
    for name in PLOT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def clear_run(output_dir: str | Path) -> None:
    """Delete what an earlier run wrote into ``output_dir``, and nothing else.

    A folder with a marker loses the names its marker lists (the :data:`RUN_FILES` of the mixsel that
    wrote it); a run of an older mixsel, without a marker, loses the names in :data:`RUN_FILES`. In
    ``plots/`` only mixsel's figures go (:data:`PLOT_FILES`); a ``config.yaml`` edited after mixsel
    wrote it is kept as ``config.yaml.edited``. The marker and the lock file stay.

    Raises:
        ConfigError: the folder is not a mixsel run (no marker, and no ``config.yaml`` and
            ``metrics.jsonl`` that mixsel wrote): nothing is deleted.
    """
    out = Path(output_dir)
    entries = _entries(out)
    if not entries:
        return
    marker = _read_marker(out)
    if marker is None and not _legacy_run(out):
        raise _not_a_run(out, entries)
    names = RUN_FILES if marker is None else RUN_FILES & {str(name) for name in marker["files"]}
    edited = marker is not None and _config_edited(out, marker)
    for name in sorted(names):
        path = out / name
        if name == "plots" and path.is_dir() and not path.is_symlink():
            _clear_plots(path)
        elif name == "config.yaml" and edited and path.is_file():
            kept = _backup_config(path)
            path.unlink()
            log.warning("%s was edited after mixsel wrote it: kept as %s", path, kept.name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ---- the run's record: marker and data fingerprint ---------------------------------------------------------------


def data_fingerprint(data: Any) -> dict[str, Any]:
    """What identifies the content of the training data ``data`` (a ``DataConfig``), for resume checks.

    Per source file its absolute path, size, modification time and the SHA-256 of its first and last
    MiB (``mixsel.data.prepared``'s key); the embedded corpus's size and hash; a saved or local
    ``datasets`` object's fingerprint. A hub dataset is recorded by name only (its content is not
    read here).
    """
    from mixsel.data.prepared import _source_fingerprint

    source = str(data.source)
    if source != "embedded" and not (os.path.exists(source) or glob.has_magic(source)):
        return {"hub": source, "hf_config": data.hf_config, "hf_split": data.hf_split}
    found = _source_fingerprint(data)
    if "embedded" in found:  # the installed file's path and time change with every install, its bytes do not
        found = {"embedded": {key: found["embedded"][key] for key in ("bytes", "sha256")}}
    return found


def record_run(cfg: ExperimentConfig, *, is_main: bool = True) -> dict[str, str]:
    """Mark ``cfg.train.output_dir`` as this run's, now that it has written ``config.yaml``; returns
    ``{"data": <the JSON of data_fingerprint(cfg.data)>}`` for the checkpoints to carry.

    On the main process, writes the marker :data:`MARKER_NAME` atomically: ``mixsel`` (the version),
    ``files`` (the names mixsel writes, which ``--overwrite`` may delete), ``config_sha256`` and
    ``config`` (``config.yaml`` as written: a later hand edit is detected and shown as a diff),
    ``created`` and ``updated``; from now on releasing the lock no longer undoes the folder. Other
    ranks write nothing and return an empty fingerprint (only the main process saves checkpoints).
    """
    import yaml

    from mixsel import __version__

    if not is_main:
        return {"data": ""}
    out = Path(cfg.train.output_dir)
    try:
        data = json.dumps(data_fingerprint(cfg.data), sort_keys=True)
    except (MixselError, OSError, ValueError) as err:
        log.info("no data fingerprint for the checkpoints (%s): a resume will not check the data", err)
        data = ""
    raw = (out / "config.yaml").read_bytes() if (out / "config.yaml").is_file() else b""
    try:
        written = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:  # pragma: no cover - mixsel wrote it
        written = None
    now = _now()
    marker = {
        "format": 1,
        "mixsel": __version__,
        "files": sorted(RUN_FILES),
        "config_sha256": _sha256(raw) if raw else None,
        "config": written if isinstance(written, dict) else None,
        "created": (_read_marker(out) or {}).get("created", now),
        "updated": now,
    }
    tmp = out / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / MARKER_NAME)
    held = _HELD.get(_key(out))
    if held is not None:
        held.opened = True
    return {"data": data}


# ---- resuming -----------------------------------------------------------------------------------------------------

_FORCE = "or pass --force-resume (train.force_resume=true) to continue with the new values"
_MISSING = object()


def check_resume(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Refuse to continue checkpoint ``state`` with a config or data that would make it a different run.

    Fields in ``mixsel.config.RESUME_SAFE_FIELDS`` (step budget, logging, evaluation, paths, threads,
    device) may change; ``train.max_steps`` must not fall below the checkpoint's step. The training
    data must be what the checkpoint saw (:func:`data_fingerprint`; a checkpoint of an older mixsel
    has none and is not checked). ``<run>/config.yaml`` must be the file mixsel wrote, or its edits
    must be this run's config (then it is kept as ``config.yaml.edited``, as mixsel rewrites it). With
    ``train.force_resume`` the changes are logged instead of refused. A refusal releases the folder's
    lock.

    Raises:
        ValueError: naming the changed fields (or data file, or edited keys) and how to force.
    """
    try:
        _check_config(state, cfg)
        _check_data(state, cfg)
        _check_config_file(cfg)
    except MixselError:
        _disown(Path(cfg.train.output_dir), cfg)
        raise


def _check_config(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    out, step = cfg.train.output_dir, int(state["step"])
    if step > cfg.train.max_steps:
        raise ConfigError(
            f"--resume: the checkpoint in {out!r} is at step {step}, past train.max_steps={cfg.train.max_steps}; "
            f"set train.max_steps >= {step} (its schedule and results are those of the longer run)"
        )
    saved = state.get("run_config")
    if saved is None:
        if cfg.train.force_resume:
            log.warning("resuming a checkpoint without a config fingerprint (train.force_resume)")
            return
        raise ConfigError(
            f"--resume: the checkpoint in {out!r} has no config fingerprint (an older mixsel wrote it), so this "
            "config cannot be checked against it; pass --force-resume (train.force_resume=true) to continue anyway"
        )
    diff = config_diff(saved, run_fields(cfg))
    if not diff:
        return
    if cfg.train.force_resume:
        log.warning("resuming step %d with changed fields (train.force_resume): %s", step, describe_diff(diff))
        return
    raise ConfigError(
        f"--resume: the checkpoint in {out!r} (step {step}) was trained with a different config: "
        f"{describe_diff(diff)}; set them back, {_FORCE}"
    )


def _files_change(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """What differs between two lists of file fingerprints, one phrase per file."""
    from mixsel.data.prepared import _HEAD_TAIL

    old = {f.get("path"): f for f in before if isinstance(f, dict)}
    new = {f.get("path"): f for f in after if isinstance(f, dict)}
    changes = []
    for path in sorted(set(old) | set(new), key=str):
        a, b = old.get(path), new.get(path)
        if a is None:
            changes.append(f"{path} is new")
        elif b is None:
            changes.append(f"{path} is gone")
        elif a.get("bytes") != b.get("bytes"):
            changes.append(f"{path} changed ({a.get('bytes')} -> {b.get('bytes')} bytes)")
        elif a.get("sha256") != b.get("sha256"):
            changes.append(f"{path} changed (same size, other content)")
        elif a.get("mtime_ns") != b.get("mtime_ns") and int(b.get("bytes") or 0) > 2 * _HEAD_TAIL:
            changes.append(f"{path} was modified (same size, first and last MiB: its middle may differ)")
    return changes


def _data_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """One phrase for what differs between two :func:`data_fingerprint` results, or ``None``."""
    if set(old) != set(new):
        return f"data.source was {' '.join(sorted(old))}, now {' '.join(sorted(new))}"
    if "files" in old:
        changes = _files_change(old["files"], new["files"])
        return _listing(changes, 3) if changes else None
    if old == new:
        return None
    return "the embedded corpus differs (another mixsel version)" if "embedded" in old else "the dataset differs"


def _check_data(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    out, step, saved = cfg.train.output_dir, int(state["step"]), state.get("data_fingerprint")
    try:
        saved = json.loads(saved) if isinstance(saved, str) and saved else None
        now = data_fingerprint(cfg.data) if isinstance(saved, dict) else None
    except (MixselError, OSError, ValueError):  # a source that cannot be read now: the data loader says why
        return
    change = _data_change(saved, now) if isinstance(saved, dict) and now is not None else None
    if change is None:
        return
    if cfg.train.force_resume:
        log.warning("resuming step %d on changed data (train.force_resume): %s", step, change)
        return
    raise ConfigError(
        f"--resume: the training data changed since the checkpoint in {out!r} (step {step}) was written: {change}; "
        "put the data back, or pass --force-resume (train.force_resume=true) to continue on the new data"
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ignored_edits(raw: bytes, written: dict[str, Any] | None, cfg: ExperimentConfig) -> str:
    """The edits in ``raw`` (a hand-edited ``config.yaml``) that this run would discard: fields whose
    value in the file is neither what mixsel wrote (``written``, unknown for an older run) nor this
    run's; ``""`` when there are none (comments, formatting, or edits this run makes too)."""
    import yaml

    try:
        tree = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):
        tree = None
    if not isinstance(tree, dict):
        return "it no longer reads as a YAML mapping"
    edited, ours, before = _flat(tree), _flat(config_to_dict(cfg)), _flat(written or {})
    keys = [
        key
        for key in sorted(set(edited) | set(ours))
        if key not in _RESUME_FLAGS
        and edited.get(key, _MISSING) != ours.get(key, _MISSING)
        and (written is None or edited.get(key, _MISSING) != before.get(key, _MISSING))
    ]
    shown = [f"{key} {edited.get(key)!r} in the file, {ours.get(key)!r} in this run" for key in keys[:4]]
    return "; ".join(shown) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


def _check_config_file(cfg: ExperimentConfig) -> None:
    """Refuse a ``<run>/config.yaml`` edited by hand whose edits this resume would discard (unless forced)."""
    path = Path(cfg.train.output_dir) / "config.yaml"
    try:
        raw = path.read_bytes()
    except OSError:
        return
    marker = _read_marker(path.parent)
    if marker is not None and marker.get("config_sha256"):
        if _sha256(raw) == marker["config_sha256"]:
            return
        written = marker.get("config") if isinstance(marker.get("config"), dict) else None
    elif _mixsel_wrote(raw.decode("utf-8", errors="replace")):
        return
    else:
        written = None
    ignored = _ignored_edits(raw, written, cfg)
    if ignored and not cfg.train.force_resume:
        raise ConfigError(
            f"--resume: {str(path)!r} was edited after mixsel wrote it ({ignored}); a run's config.yaml records "
            "its config and is not read back: pass the values as overrides (key=value) or with --config, or pass "
            f"--force-resume (train.force_resume=true) to continue with this run's config (your file is kept as "
            f"{EDITED_NAME})"
        )
    if not _is_main_rank():
        return
    kept = _backup_config(path)
    if ignored:
        log.warning(
            "%s was edited (%s): continuing with this run's config (train.force_resume), kept as %s",
            path,
            ignored,
            kept.name,
        )
    else:
        log.info("%s was edited after mixsel wrote it: kept as %s, as this run writes its own", path, kept.name)
