"""Run folders shared, reused and edited: one run per folder, nothing of the user's deleted, no silent resume.

* the lock: a folder in use (a real process holds its lock) refuses a second run, ``--resume`` and
  ``--overwrite`` with one line naming the holder; a lock left by a killed process is taken over with a
  warning; two ``mixsel train`` started together on one folder: one trains, the other is refused, and
  the winner's ``metrics.jsonl`` is whole;
* the marker: ``--overwrite`` never empties a folder that is not a mixsel run (only ``plots/my_figure.png``,
  or the user's own commented ``config.yaml``), and in a run's folder deletes only what mixsel wrote;
* resume: a data file edited in place, or a hand edit of ``<run>/config.yaml`` that the resume would
  discard, is refused with one line naming the file or the key; ``--force-resume`` accepts (the edited
  file is kept as ``config.yaml.edited``).

Refusals run ``mixsel ...`` in-process (as ``test_bad_inputs.py``) and assert exit status 2, one stderr
line, and every file byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mixsel
from mixsel.cli import main

from _fast import FAST

pytest.importorskip("transformers")

ROWS = "".join(json.dumps({"domain": d, "text": f"{d} row {i} " * 3}) + "\n" for d in ("a", "b") for i in range(30))
# a process that takes a run folder's lock, says so, and keeps it until it is killed
HOLD = (
    "import sys, time\n"
    "from mixsel.runfolder import lock_run_folder\n"
    "lock_run_folder(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(300)\n"
)


def _env() -> dict[str, str]:
    src = str(Path(mixsel.__file__).parents[1])  # this checkout's code, whatever the working directory
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("MIXSEL_DEBUG", None)
    env.pop("RANK", None)
    return env


def _args(out: Path, data: Path | None = None, *extra: str) -> list[str]:
    source = [f"data.source={data}"] if data is not None else []
    return ["train", "-q", *FAST, "eval.exact_match=0", "train.max_steps=4", *source, f"train.output_dir={out}", *extra]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the SHA-256 of its bytes (``"dir"`` for folders)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _refused(argv: list[str], root: Path, capsys, expect: str) -> str:
    """``mixsel argv`` in-process: exit status 2, one stderr line holding ``expect``, nothing under ``root`` changed."""
    before = _snapshot(root)
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mixsel: error: "), lines
    assert expect in lines[0], lines[0]
    assert _snapshot(root) == before, "files were written or changed"
    return lines[0]


def _hold(out: Path) -> subprocess.Popen:
    """A real process holding the lock of ``out`` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    line = proc.stdout.readline()
    assert line.strip() == b"locked", proc.stderr.read().decode()[-2000:] if proc.poll() is not None else line
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a micro run stopped after step 2 of 4 with checkpoints, its data file)."""
    from mixsel.config import load_config
    from mixsel.train import train

    root = tmp_path_factory.mktemp("runfolders")
    data = root / "d.jsonl"
    data.write_text(ROWS)
    out = root / "run"
    overrides = [*FAST, "eval.exact_match=0", "train.max_steps=4", f"data.source={data}", f"train.output_dir={out}"]
    cfg = load_config(None, overrides)
    cfg.train.save_every, cfg.train.stop_after = 1, 2
    assert train(cfg, progress=False) == {"stopped_at": 2}
    return out, data


def _copy(trained: tuple[Path, Path], tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(trained[0], run)
    return run


# ---- the lock -----------------------------------------------------------------------------------------------------


def test_a_finished_run_leaves_a_marker_and_no_lock(trained):
    run, _ = trained
    marker = json.loads((run / ".mixsel-run.json").read_text())
    assert marker["mixsel"] == mixsel.__version__ and "config.yaml" in marker["files"]
    assert marker["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert not (run / ".mixsel.lock").exists()  # released when the run's config was collected


def test_a_folder_in_use_refuses_a_second_run_resume_and_overwrite(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    fresh = tmp_path / "fresh"
    holders = [_hold(run), _hold(fresh)]
    try:
        for proc, argv in (
            (holders[1], _args(fresh)),
            (holders[0], _args(run, trained[1], "--resume")),
            (holders[0], _args(run, trained[1], "--overwrite")),
        ):
            line = _refused(argv, tmp_path, capsys, "is in use by another mixsel run")
            assert f"pid {proc.pid}@" in line and "since" in line, line
    finally:
        for proc in holders:
            _kill(proc)


def test_a_stale_lock_is_taken_over_with_a_warning(trained, tmp_path, capsys, caplog):
    run = _copy(trained, tmp_path)
    proc = _hold(run)
    _kill(proc)  # killed: the kernel dropped its lock, its lock file stays
    assert str(proc.pid) in (run / ".mixsel.lock").read_text()
    with caplog.at_level(logging.WARNING, logger="mixsel.runfolder"):
        assert main(_args(run, trained[1], "--resume")) == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.name == "mixsel.runfolder"]
    assert any("taking over the lock" in w and f"pid {proc.pid}@" in w for w in warnings), warnings
    assert (run / "result.json").exists() and not (run / ".mixsel.lock").exists()


def test_only_rank_0_locks(tmp_path, monkeypatch):
    from mixsel.runfolder import lock_run_folder

    monkeypatch.setenv("RANK", "1")
    assert lock_run_folder(tmp_path / "out") is False
    assert not (tmp_path / "out").exists()


def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "mixsel", *_args(out)]
    procs = [
        subprocess.Popen(argv, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refusal) == 1, refusal
    assert "is in use by another mixsel run" in refusal[0] or "already holds a run" in refusal[0], refusal
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s is not None]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps
    assert json.loads((out / "result.json").read_text())["steps"] == 4
    assert not (out / ".mixsel.lock").exists()


# ---- the marker: --overwrite deletes only what mixsel wrote -------------------------------------------------------


def test_overwrite_never_empties_a_folder_with_only_the_users_plots(tmp_path, capsys):
    figure = tmp_path / "out" / "plots" / "my_figure.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG mine")
    for extra in ((), ("--overwrite",)):
        _refused(_args(tmp_path / "out", None, *extra), tmp_path, capsys, "is not a mixsel run")


def test_the_users_commented_config_yaml_is_never_rewritten(tmp_path, capsys, monkeypatch):
    from mixsel.config import load_config, save_config

    save_config(load_config(None, [*FAST, "train.output_dir=."]), tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("# my settings\n" + (tmp_path / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--overwrite",), ("--config", "config.yaml", "--overwrite")):
        _refused(_args(Path("."), None, *extra), tmp_path, capsys, "is not a mixsel run")


def test_clear_run_deletes_only_what_mixsel_wrote(trained, tmp_path):
    from mixsel.runfolder import clear_run

    run = _copy(trained, tmp_path)
    (run / "plots").mkdir()
    (run / "plots" / "loss.png").write_bytes(b"mixsel's")
    (run / "plots" / "my_figure.png").write_bytes(b"mine")
    clear_run(run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        ".mixsel-run.json",
        "plots",
        "plots/my_figure.png",
    ]


def test_clear_run_keeps_a_hand_edited_config_and_refuses_a_folder_that_is_not_a_run(trained, tmp_path):
    from mixsel.runfolder import clear_run

    run = _copy(trained, tmp_path)
    edited = (run / "config.yaml").read_text().replace("lr: ", "lr: 0.5 # was ", 1)
    (run / "config.yaml").write_text(edited)
    clear_run(run)
    assert (run / "config.yaml.edited").read_text() == edited and not (run / "config.yaml").exists()
    (run / ".mixsel-run.json").unlink()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a mixsel run"):
        clear_run(run)
    assert (run / "notes.txt").read_text() == "mine"


def test_a_run_of_an_older_mixsel_without_a_marker_can_still_be_replaced(tmp_path):
    from mixsel.config import load_config, save_config
    from mixsel.runfolder import clear_run, plan_run_folder

    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    save_config(load_config(None, [f"train.output_dir={out}"]), out / "config.yaml")
    assert plan_run_folder(load_config(None, [f"train.output_dir={out}", "train.overwrite=true"])) == "overwrite"
    clear_run(out)
    assert list(out.iterdir()) == []


# ---- resume: the data and config.yaml are those the checkpoint was written with -----------------------------------


def test_resume_after_the_data_file_changed_is_refused_then_forced(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    data = trained[1]
    original, stat = data.read_bytes(), data.stat()
    try:
        data.write_bytes(original.replace(b"a row 3 ", b"a ROW 3 "))  # same size, same rows and domains
        line = _refused(_args(run, data, "--resume"), tmp_path, capsys, "training data changed")
        assert str(data) in line and "--force-resume" in line, line
        assert main(_args(run, data, "--resume", "--force-resume")) == 0, capsys.readouterr().err
        assert (run / "result.json").exists()
    finally:
        data.write_bytes(original)
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_checkpoint_without_a_data_fingerprint_resumes_as_before(tmp_path):
    from mixsel.config import load_config, run_fields
    from mixsel.runfolder import check_resume

    data = tmp_path / "d.jsonl"
    data.write_text(ROWS)
    cfg = load_config(None, [f"train.output_dir={tmp_path}", f"data.source={data}"])
    check_resume({"step": 2, "run_config": run_fields(cfg)}, cfg)  # an older mixsel's checkpoint
    os.utime(data, ns=(0, 10**18))  # a touched small file: same bytes, so the same data
    from mixsel.runfolder import data_fingerprint

    saved = json.dumps(data_fingerprint(cfg.data))
    os.utime(data, ns=(0, 2 * 10**18))
    check_resume({"step": 2, "run_config": run_fields(cfg), "data_fingerprint": saved}, cfg)


def test_resume_after_a_hand_edit_of_config_yaml_is_refused_then_forced(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    written = (run / "config.yaml").read_text()
    edited = written.replace("  weight_decay: 0.0\n", "  weight_decay: 0.5  # less overfitting\n", 1)
    assert edited != written
    (run / "config.yaml").write_text(edited)
    line = _refused(_args(run, trained[1], "--resume"), tmp_path, capsys, "train.weight_decay 0.5 in the file")
    assert "config.yaml" in line and "--force-resume" in line, line
    assert main(_args(run, trained[1], "--resume", "--force-resume")) == 0, capsys.readouterr().err
    assert (run / "config.yaml.edited").read_text() == edited
    assert "  weight_decay: 0.0\n" in (run / "config.yaml").read_text()  # mixsel's record of the run it continued


def test_resume_with_the_edits_in_effect_keeps_the_edited_file(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    written = (run / "config.yaml").read_text()
    edited = "# run x, extended to 6 steps\n" + written.replace("  max_steps: 4\n", "  max_steps: 6\n", 1)
    (run / "config.yaml").write_text(edited)
    assert main(_args(run, trained[1], "--resume", "train.max_steps=6")) == 0, capsys.readouterr().err
    assert (run / "config.yaml.edited").read_text() == edited
    assert json.loads((run / "result.json").read_text())["steps"] == 6
