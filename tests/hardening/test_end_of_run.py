"""Nothing trained is lost at the end of a run, on a full disk, on SIGTERM / SIGINT or after a divergence.

Each test runs ``mixsel train`` in-process (``mixsel.cli.main``) on the micro model of ``_fast.FAST``, 4
steps. The runs that fail start from a copy of a run stopped after step 2 (``stopped``), and every
run that is continued must end equal to an uninterrupted one (``straight``): the same ``val/`` and
``test/`` metrics in ``result.json`` and the same ``final/`` weights, bit for bit.

* the end of a run: the trained state is checkpointed before the final evaluation and writes, so an
  answer checker that raises, or a full disk while writing ``final/``, leaves a run that ``--resume``
  completes (running only the final evaluation and writes);
* a full disk, whichever way the library reports it (``OSError`` ENOSPC / EDQUOT, ``torch.save``'s
  ``RuntimeError``, safetensors' ``SafetensorError``): one line naming the folder and the bytes needed,
  exit status 2, no temporary file left, the previous checkpoint untouched;
* SIGTERM / SIGINT: the step finishes, a checkpoint is saved, one line, exit status 143 / 130 (a
  second signal while saving changes nothing), and ``--resume`` continues exactly;
* divergence: the advice in the message, followed word for word, continues or restarts the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mixsel.cli import main

from _fast import FAST

pytest.importorskip("transformers")

STEPS = 4


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "-q", *FAST, f"train.max_steps={STEPS}", f"train.output_dir={out}", *extra]


def _run(argv: list[str], capsys: Any) -> tuple[int, list[str]]:
    """``mixsel`` in-process: (exit status, the non-empty stderr lines)."""
    code = main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _clean(monkeypatch: Any) -> None:
    """Undo the test's faults, keeping the offline hub and no MIXSEL_DEBUG."""
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MIXSEL_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    _clean(monkeypatch)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every continued one must end equal to."""
    out = tmp_path_factory.mktemp("end") / "straight"
    assert main(_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run stopped after step 2 (train.stop_after), with its checkpoint."""
    out = tmp_path_factory.mktemp("end") / "stopped"
    assert main(_args(out, "train.stop_after=2", "train.save_every=1")) == 0
    return out


@pytest.fixture
def run(stopped, tmp_path) -> Path:
    """A copy of ``stopped`` to fail and continue."""
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def _step(out: Path, name: str = "checkpoint") -> int:
    return json.loads((out / name / "manifest.json").read_text())["step"]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _no_temporaries(out: Path) -> None:
    left = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a = json.loads((a_dir / "result.json").read_text())
    b = json.loads((b_dir / "result.json").read_text())
    keys = [k for k in a if k.startswith(("val/", "test/"))]
    assert keys and {k: a[k] for k in keys} == {k: b.get(k) for k in keys}
    from transformers import AutoModelForCausalLM

    pa = AutoModelForCausalLM.from_pretrained(a_dir / "final").state_dict()
    pb = AutoModelForCausalLM.from_pretrained(b_dir / "final").state_dict()
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key
    steps = [json.loads(line)["step"] for line in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # nothing trained twice


def _resume_completes(out: Path, straight: Path, capsys: Any, monkeypatch: Any, *extra: str) -> None:
    _clean(monkeypatch)
    code, lines = _run([*_args(out, *extra), "--resume"], capsys)
    assert code == 0, lines
    _assert_same_run(straight, out)


# ---- the end of a run ---------------------------------------------------------------------------------------------


def test_the_trained_state_is_saved_before_the_final_evaluation(straight):
    """train.save_every=0: the last step is checkpointed (before the final evaluation) and kept."""
    assert _step(straight) == STEPS
    assert (straight / "result.json").exists() and (straight / "final").is_dir()


def test_a_failing_answer_check_leaves_a_run_that_resume_completes(run, straight, monkeypatch, capsys):
    import mixsel.evaluate

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the answer checker failed")

    monkeypatch.setattr(mixsel.evaluate, "exact_match", broken)
    code, lines = _run([*_args(run), "--resume"], capsys)
    assert code != 0 and len(lines) == 1 and "the answer checker failed" in lines[0], lines
    assert _step(run) == STEPS  # every step trained and saved
    assert not (run / "result.json").exists()
    _resume_completes(run, straight, capsys, monkeypatch)


def _safetensors_full(*args: Any, **kwargs: Any) -> None:
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _quota(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


@pytest.mark.parametrize(("fault", "reason"), [(_safetensors_full, "no space left"), (_quota, "quota exceeded")])
def test_full_disk_writing_final_is_one_line_and_resume_completes(fault, reason, run, straight, monkeypatch, capsys):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fault)
    code, lines = _run([*_args(run), "--resume"], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mixsel: error: could not write the final model"), lines
    assert reason in lines[0] and "final/ needs about" in lines[0] and str(run) in lines[0], lines[0]
    assert "--resume" in lines[0]
    assert not (run / "final").exists() and not (run / "result.json").exists()
    _no_temporaries(run)
    assert _step(run) == STEPS
    _resume_completes(run, straight, capsys, monkeypatch)


# how a full disk reaches save_checkpoint: OSError from Python, RuntimeError from torch.save's writer
# (the "unexpected pos" one has no errno: counted as a full disk when the folder has less free than needed)
_TORCH_SAVE_FAULTS = {
    "oserror-enospc": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left on device"),
    "torch-file-write-failed": (
        RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: "
                     "file write failed"),
        "no space left on device",
    ),
    "torch-unexpected-pos": (
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        "no space left on device",
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", list(_TORCH_SAVE_FAULTS))
def test_full_disk_during_a_checkpoint_is_one_line_exit_2(fault, run, monkeypatch, capsys):
    import mixsel.checkpoint

    error, reason = _TORCH_SAVE_FAULTS[fault]

    def full(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half a checkpoint")  # what a full disk leaves
        raise error

    before = _snapshot(run)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(mixsel.checkpoint, "free_bytes", lambda folder: 1000)  # the disk is full
    code, lines = _run([*_args(run, "train.save_every=1"), "--resume"], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and "could not write the step-3 checkpoint" in lines[0], lines
    assert reason in lines[0] and "it needs about" in lines[0] and "1 KB were free" in lines[0], lines[0]
    assert str(run) in lines[0] and "the previous checkpoint (step 2)" in lines[0] and "--resume" in lines[0]
    assert not (run / ".checkpoint.tmp").exists()
    after = _snapshot(run)
    kept = ("checkpoint", "checkpoint.prev")
    assert {k: v for k, v in after.items() if k.startswith(kept)} == {
        k: v for k, v in before.items() if k.startswith(kept)
    }


def test_a_failed_write_that_is_not_a_full_disk_says_so(run, monkeypatch, capsys):
    def failed(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", failed)
    code, lines = _run([*_args(run, "train.save_every=1"), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "(a write failed; it needs about" in lines[0], lines


def test_other_errors_while_saving_are_still_bugs(run, monkeypatch, capsys):
    def bug(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the saving code")

    monkeypatch.setattr(torch, "save", bug)
    code, lines = _run([*_args(run, "train.save_every=1"), "--resume"], capsys)
    assert code == 1 and len(lines) == 1 and "internal error" in lines[0], lines
    assert not (run / ".checkpoint.tmp").exists()


# ---- SIGTERM / SIGINT ---------------------------------------------------------------------------------------------


def _send(signum: int) -> None:
    """Send ``signum`` to this process, only while mixsel's handler holds it (never kill pytest)."""
    handler = signal.getsignal(signum)
    assert type(getattr(handler, "__self__", None)).__name__ == "_Signals", "mixsel's handler is not installed"
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize(("name", "status", "twice"), [("SIGTERM", 143, False), ("SIGINT", 130, True)])
def test_a_signal_finishes_the_step_saves_and_resume_is_exact(name, status, twice, run, straight, monkeypatch, capsys):
    import mixsel.train

    signum = getattr(signal, name)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    real_step, real_save = mixsel.train._optimizer_step, mixsel.train.save_checkpoint

    def step(*args: Any, **kwargs: Any) -> float:
        _send(signum)  # arrives mid-step: the step still finishes
        return real_step(*args, **kwargs)

    def save(*args: Any, **kwargs: Any) -> Any:
        if twice:
            _send(signum)  # a second signal while saving
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mixsel.train, "_optimizer_step", step)
    monkeypatch.setattr(mixsel.train, "save_checkpoint", save)
    code, lines = _run([*_args(run), "--resume"], capsys)
    assert code == status, lines
    assert lines == [
        f"mixsel: stopped by {name} after step 3; checkpoint saved in {run / 'checkpoint'}; resume with --resume"
    ]
    assert _step(run) == 3 and _step(run, "checkpoint.prev") == 2
    assert not (run / "result.json").exists()
    _no_temporaries(run)
    assert {s: signal.getsignal(s) for s in previous} == previous  # the handlers are given back
    _resume_completes(run, straight, capsys, monkeypatch)


def test_a_signal_stops_mixsel_compare_and_running_it_again_continues(tmp_path, monkeypatch, capsys):
    import mixsel.train

    spec = {
        "overrides": [*FAST, "eval.exact_match=0", f"train.max_steps={STEPS}"],
        "output_dir": "out",
        "runs": {"a": []},
    }
    (tmp_path / "cmp.yaml").write_text(json.dumps(spec))
    real_step = mixsel.train._optimizer_step

    def step(*args: Any, step: int, **kwargs: Any) -> float:
        if step == 1:  # the second step
            _send(signal.SIGTERM)
        return real_step(*args, step=step, **kwargs)

    monkeypatch.setattr(mixsel.train, "_optimizer_step", step)
    code, lines = _run(["compare", "-q", "--config", str(tmp_path / "cmp.yaml")], capsys)
    run = tmp_path / "out" / "a" / "seed0"
    assert code == 143, lines
    assert lines == [
        f"mixsel: stopped by SIGTERM after step 2; checkpoint saved in {run / 'checkpoint'}; "
        "run the same mixsel compare again to continue"
    ]
    _clean(monkeypatch)
    code, lines = _run(["compare", "-q", "--config", str(tmp_path / "cmp.yaml")], capsys)
    assert code == 0, lines
    assert (run / "result.json").exists() and _step(run) == STEPS


# ---- divergence: the advice works as written ----------------------------------------------------------------------


def _advice(line: str, lr: float) -> tuple[float, list[str]]:
    """The learning rate in ``line`` ("lower train.lr (now 0.001)"; else ``lr``) and the flags it says to use."""
    assert "lower train.lr" in line
    now = re.search(r"lower train\.lr \(now ([^)]+)\)", line)
    lr = float(now.group(1)) if now else lr
    flags = re.search(r"then (?:continue from it|start again) with ((?:--[\w-]+ ?)+)", line).group(1).split()
    return lr, flags


def test_divergence_advice_with_a_checkpoint_works_as_written(run, monkeypatch, capsys):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    code, lines = _run([*_args(run), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "diverged" in lines[0], lines
    assert "the last good checkpoint (step 2)" in lines[0]
    lr, flags = _advice(lines[0], yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"])
    assert flags == ["--resume", "--force-resume"]
    _clean(monkeypatch)
    lower = f"train.lr={lr / 10:g}"
    # a plain --resume refuses the lower learning rate: a config change (the reason the advice names --force-resume)
    code, lines = _run([*_args(run, lower), "--resume"], capsys)
    assert code == 2 and "train.lr" in lines[0] and "--force-resume" in lines[0], lines
    code, lines = _run([*_args(run, lower), *flags], capsys)
    assert code == 0, lines
    assert json.loads((run / "result.json").read_text())["config"]["train"]["lr"] == pytest.approx(lr / 10)


def test_divergence_advice_without_a_checkpoint_works_as_written(tmp_path, capsys):
    out = tmp_path / "run"
    code, lines = _run(_args(out, "train.lr=100.0", "train.warmup_steps=0"), capsys)
    assert code == 2 and len(lines) == 1 and "diverged" in lines[0] and "no checkpoint was saved yet" in lines[0]
    lr, flags = _advice(lines[0], 100.0)
    assert flags == ["--overwrite"]
    code, lines = _run([*_args(out, f"train.lr={lr / 1e5:g}", "train.warmup_steps=0"), *flags], capsys)
    assert code == 0, lines
    assert (out / "result.json").exists()
