"""Run folders: what a new run, --overwrite and --resume may do with a folder (no training here)."""

from __future__ import annotations

import pytest

from mixsel.config import load_config, run_fields, save_config
from mixsel.runfolder import check_resume, clear_run, plan_run_folder


def _cfg(out, *extra):
    return load_config(None, [f"train.output_dir={out}", *extra])


def _fake_run(out):
    """The files a finished run with checkpoints leaves (their content does not matter here)."""
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(b"x")
    (out / "final").mkdir()
    for name in ("metrics.jsonl", "result.json", "selections.jsonl"):
        (out / name).write_text("{}\n")
    save_config(_cfg(out), out / "config.yaml")


def test_new_runs_overwrites_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert plan_run_folder(_cfg(out)) == "fresh"  # not there yet
    out.mkdir()
    assert plan_run_folder(_cfg(out)) == "fresh"  # empty
    _fake_run(out)
    with pytest.raises(ValueError, match="already holds a run .*--resume.*--overwrite"):
        plan_run_folder(_cfg(out))
    assert plan_run_folder(_cfg(out, "train.overwrite=true")) == "overwrite"
    assert plan_run_folder(_cfg(out, "train.resume=true")) == "resume"


def test_overwrite_deletes_the_run_files_only(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    clear_run(out)
    assert list(out.iterdir()) == []
    _fake_run(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a mixsel run's \(notes.txt\)"):
        plan_run_folder(_cfg(out, "train.overwrite=true"))
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_accepts_fields_that_do_not_alter_the_run(tmp_path):
    cfg = _cfg(tmp_path)
    state = {"step": 4, "run_config": run_fields(cfg)}
    for override in (
        "train.max_steps=400",
        "train.log_every=1",
        "train.save_every=2",
        "train.threads=1",
        "eval.every=5",
        "eval.exact_match=0",
        "train.output_dir=elsewhere",
        "train.device=cpu",
        "name=renamed",
    ):
        check_resume(state, load_config(None, [f"train.output_dir={tmp_path}", override]))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("seed=1", "seed 0 -> 1"),
        ("train.lr=0.1", "train.lr"),
        ("selection.method=stratified", "selection.method"),
        ("reweighting.method=doremi", "reweighting.method"),
        ("data.max_length=64", "data.max_length"),
        ("train.batch_size=8", "train.batch_size"),
        ("train.max_steps=3", "past train.max_steps=3"),
    ],
)
def test_resume_refuses_fields_that_alter_the_run(tmp_path, override, field):
    state = {"step": 4, "run_config": run_fields(_cfg(tmp_path))}
    cfg = _cfg(tmp_path, override)
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        check_resume(state, cfg)
    if not override.startswith("train.max_steps"):
        cfg.train.force_resume = True
        check_resume(state, cfg)  # forced: logged, not refused
