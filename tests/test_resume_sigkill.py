"""A run killed with SIGKILL (between steps, or in the middle of a checkpoint save), or stopped by SIGTERM
or SIGINT at random times, and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixsel

from _fast import FAST

pytest.importorskip("transformers")

STEPS = 24

# Runs mixsel in a process that kills itself (SIGKILL, as a power cut) during its KILL_AT-th
# checkpoint save: "mid-write" after writing half of state.pt, "between-renames" after the latest
# checkpoint became checkpoint.prev but before the new one took its place.
KILLER = """
import os, signal, sys
import torch
import mixsel.checkpoint as ck

where, at = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
count = {"save": 0, "swap": 0}
real_save, real_replace = torch.save, os.replace

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    count["save"] += 1
    if where == "mid-write" and count["save"] == at:
        os.truncate(f, os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, *args, **kwargs):
    if str(src).endswith(ck.TMP_NAME):
        count["swap"] += 1
        if where == "between-renames" and count["swap"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

torch.save, os.replace = save, replace
from mixsel.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "mixsel",
        "train",
        "--quiet",
        *FAST,
        f"train.output_dir={out}",
        f"train.max_steps={STEPS}",
        "train.save_every=4",
        "eval.every=8",
        "eval.exact_match=0",
        *extra,
    ]


def _env(**extra):
    src = str(Path(mixsel.__file__).parents[1])  # this checkout's code in the child processes
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}
    return env


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("sigkill") / "straight"
    subprocess.run(_cmd(out), check=True, env=_env(), capture_output=True, timeout=600)
    return out


def _assert_same_run(a_dir, b_dir):
    a = json.loads((a_dir / "result.json").read_text())
    b = json.loads((b_dir / "result.json").read_text())
    for key in a:
        if key.startswith(("val/", "test/")):
            assert a[key] == b[key], key
    from transformers import AutoModelForCausalLM

    pa = AutoModelForCausalLM.from_pretrained(a_dir / "final").state_dict()
    pb = AutoModelForCausalLM.from_pretrained(b_dir / "final").state_dict()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


def test_sigkill_then_resume_matches_uninterrupted(straight, tmp_path):
    killed = tmp_path / "killed"

    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed; raise STEPS"
    assert state.exists()

    subprocess.run([*_cmd(killed), "--resume"], check=True, env=_env(), capture_output=True, timeout=600)
    _assert_same_run(straight, killed)


@pytest.mark.parametrize("where", ["mid-write", "between-renames"])
def test_kill_during_checkpoint_save_then_resume_matches(straight, tmp_path, where):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILLER, *_cmd(killed)[3:]]  # the same arguments after "-m mixsel"
    proc = subprocess.run(cmd, env=_env(KILL_WHERE=where, KILL_AT="3"), capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (killed / ".checkpoint.tmp").exists()  # the interrupted save
    assert (killed / "checkpoint.prev").exists() and not (killed / "result.json").exists()
    resumed = subprocess.run([*_cmd(killed), "--resume"], env=_env(), capture_output=True, timeout=600, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if where == "between-renames":
        assert "resuming from the previous checkpoint (step 8)" in resumed.stderr
    assert not (killed / ".checkpoint.tmp").exists()
    _assert_same_run(straight, killed)


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _stop_with(out: Path, resume: bool, at: int, signals: list[signal.Signals]) -> int:
    """Start the run (or ``--resume`` it), send ``signals`` once ``at`` steps are logged; the step it stopped after."""
    cmd = [*_cmd(out), *(["--resume"] if resume else [])]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _steps_logged(out) < at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for signum in signals:  # a second one, right after the first, arrives while the step finishes
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    name = signals[0].name
    assert proc.returncode == 128 + signals[0], err[-2000:]
    last = err.strip().splitlines()[-1]  # after the data warnings of the start
    found = re.fullmatch(
        rf"mixsel: stopped by {name} after step (\d+); checkpoint saved in (.+); resume with --resume", last
    )
    assert found and "Traceback" not in err and err.count("mixsel: ") == 1, err[-2000:]
    step = int(found.group(1))
    assert at <= step < STEPS and Path(found.group(2)) == out / "checkpoint"
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["step"] == step
    assert _steps_logged(out) == step and not (out / "result.json").exists() and not (out / ".checkpoint.tmp").exists()
    return step


def test_sigterm_sigint_then_resume_matches_uninterrupted(straight, tmp_path):
    """SIGTERM at a random step, then SIGINT twice at a later random step (Ctrl-C pressed again); each
    stops after the step it interrupts, and the resumed run ends bit for bit as the uninterrupted one.
    The seed is printed for a rerun (MIXSEL_SOAK_SEED). A second signal during the save itself:
    tests/hardening/test_end_of_run.py."""
    seed = int(os.environ.get("MIXSEL_SOAK_SEED", random.randrange(2**32)))
    print(f"MIXSEL_SOAK_SEED={seed}")
    rng = random.Random(seed)
    stopped = tmp_path / "stopped"
    first = _stop_with(stopped, False, rng.randrange(1, STEPS // 2), [signal.SIGTERM])
    _stop_with(stopped, True, rng.randrange(first + 2, STEPS - 4), [signal.SIGINT, signal.SIGINT])
    subprocess.run([*_cmd(stopped), "--resume"], check=True, env=_env(), capture_output=True, timeout=600)
    _assert_same_run(straight, stopped)


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import mixsel.features.loss as loss_mod
    from mixsel.checkpoint import load_checkpoint
    from mixsel.config import load_config
    from mixsel.train import train

    def cfg(*extra):
        return load_config(
            None, [*FAST, f"train.output_dir={tmp_path}", "train.max_steps=8", "eval.exact_match=0", *extra]
        )

    assert train(cfg("train.stop_after=4"), progress=False) == {"stopped_at": 4}
    before = load_checkpoint(tmp_path)
    real = loss_mod.token_losses  # the training step's per-token losses
    monkeypatch.setattr(loss_mod, "token_losses", lambda logits, labels: real(logits, labels) * float("inf"))
    with pytest.raises(FloatingPointError, match="continue from it with --resume --force-resume"):
        train(cfg("train.resume=true", "train.save_every=1"), progress=False)
    after = load_checkpoint(tmp_path)
    assert after["step"] == before["step"] == 4
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key])
