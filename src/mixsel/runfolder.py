"""Run folders: never overwritten by accident, resumed only by the run that wrote them.

A run folder holds the files of one run (:data:`RUN_FILES`). Before anything is written:

* :func:`check_output_dir` refuses a path that cannot be a run folder (a file, a folder under a file,
  a name too long for the file system, a folder that is not writable);
* :func:`plan_run_folder` refuses a folder that holds another run unless the run resumes it
  (``--resume``) or replaces it (``--overwrite``), refuses files that are not a run's even then, and
  refuses ``--resume`` when there is no checkpoint;
* :func:`check_resume` compares the checkpoint's config fingerprint with this run's config and
  refuses a changed field that alters the run (``mixsel.config.RESUME_SAFE_FIELDS`` lists the ones
  that do not), unless ``--force-resume``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mixsel.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
from mixsel.config import ExperimentConfig, config_diff, describe_diff, run_fields
from mixsel.errors import ConfigError

__all__ = ["RUN_FILES", "check_output_dir", "check_resume", "clear_run", "plan_run_folder"]

log = logging.getLogger(__name__)

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


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.yaml`` that mixsel wrote (every section of an experiment), not a
    user's own file of that name."""
    import dataclasses

    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and set(tree) == {f.name for f in dataclasses.fields(ExperimentConfig)}


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_run_folder(cfg: ExperimentConfig) -> str:
    """Decide how this run may use ``cfg.train.output_dir``: ``"fresh"``, ``"overwrite"`` or ``"resume"``.

    Raises:
        ValueError: the folder cannot hold a run (see :func:`check_output_dir`); it holds another run
            and neither ``train.resume`` nor ``train.overwrite`` is set; it holds files that are not a
            run's (even with ``--overwrite``); or ``train.resume`` is set and there is no checkpoint.
    """
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    entries = sorted(os.listdir(out)) if out.is_dir() else []
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
    foreign = [
        name for name in entries if name not in RUN_FILES or (name == "config.yaml" and not _is_run_config(out / name))
    ]
    if foreign:
        raise ConfigError(
            f"train.output_dir={str(out)!r} holds files that are not a mixsel run's ({_listing(foreign)}); "
            "choose an empty or new folder (e.g. train.output_dir=runs/<name>)"
        )
    if not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds a run ({_listing(entries)}): continue it with --resume, "
            "replace it with --overwrite, or choose another folder"
        )
    return "overwrite"


def clear_run(output_dir: str | Path) -> None:
    """Delete the files an earlier run wrote into ``output_dir`` (:data:`RUN_FILES` only)."""
    out = Path(output_dir)
    for name in sorted(RUN_FILES):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def check_resume(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Refuse to continue checkpoint ``state`` with a config that would make it a different run.

    Fields in ``mixsel.config.RESUME_SAFE_FIELDS`` (step budget, logging, evaluation, paths, threads,
    device) may change; ``train.max_steps`` must not fall below the checkpoint's step. With
    ``train.force_resume`` the other changes are logged instead of refused.

    Raises:
        ValueError: naming the changed fields and how to force.
    """
    out, step = cfg.train.output_dir, int(state["step"])
    if step > cfg.train.max_steps:
        raise ConfigError(
            f"--resume: the checkpoint in {out!r} is at step {step}, past train.max_steps={cfg.train.max_steps}; "
            f"set train.max_steps >= {step} (its schedule and results are those of the longer run)"
        )
    saved = state.get("run_config")
    force = "or pass --force-resume (train.force_resume=true) to continue with the new values"
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
        f"{describe_diff(diff)}; set them back, {force}"
    )
