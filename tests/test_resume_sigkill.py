"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _fast import FAST

pytest.importorskip("transformers")

STEPS = 60


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
        "train.save_every=5",
        "eval.every=20",
        "eval.exact_match=0",
        *extra,
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight), check=True, env=_env(), capture_output=True, timeout=600)

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
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((killed / "result.json").read_text())
    for key in a:
        if key.startswith(("val/", "test/")):
            assert a[key] == b[key], key
    from transformers import AutoModelForCausalLM

    pa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    pb = AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


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
    with pytest.raises(FloatingPointError, match="resume from the last checkpoint"):
        train(cfg("train.resume=true", "train.save_every=1"), progress=False)
    after = load_checkpoint(tmp_path)
    assert after["step"] == before["step"] == 4
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key])
