"""Loggers from ``train.report_to``: TensorBoard scalars read back, W&B offline, single-run plots; the launch line."""

from __future__ import annotations

import json

import pytest

from mixsel.logging import build_loggers, check_world, launch_message, progress_postfix

from _fast import FAST

pytest.importorskip("transformers")


def test_train_reports_to_tensorboard_and_wandb_and_draws_its_plots(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mixsel.config import load_config
    from mixsel.train import train

    loggers = ["tensorboard"]
    try:
        import wandb  # noqa: F401

        loggers.append("wandb")
    except ImportError:
        pass
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no key: the logger itself must choose offline
    out = tmp_path / "run"
    overrides = [
        *FAST,
        "train.max_steps=3",
        "eval.exact_match=0",
        f"train.report_to=[{', '.join(loggers)}]",
        "train.plots=true",
        "reweighting.method=static",
        "reweighting.options={weights: [1, 1, 1, 2, 1, 1, 1]}",
        f"train.output_dir={out}",
    ]
    train(load_config(None, overrides), progress=False)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("train/loss", "time/step", "time/select", "weights/arithmetic", "select/frac/arithmetic"):
        assert key in tags, key
        logged = [(r["step"], r[key]) for r in rows if key in r]
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in logged]
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert "val/loss_mean" in tags
    if "wandb" in loggers:
        runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0
    for name in ("loss", "domain_loss", "weights", "composition"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name


def test_unknown_logger_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['tensorbord'\]; valid"):
        build_loggers(tmp_path, ["tensorbord"])


def test_launch_line_and_progress_postfix(monkeypatch):
    one = launch_message("mixsel train", world_size=1, backend="none", mode="global", selector="colm", batch=4, pool=8)
    assert one == "mixsel train: world size 1 (one process); colm selects 4 of a pool of 8 per step"
    two = launch_message(
        "SelectionTrainer",
        world_size=2,
        backend="gloo",
        mode="local",
        selector="random",
        batch=4,
        pool=12,
        rank=1,
        per_rank=True,
    )
    assert two.startswith("SelectionTrainer: world size 2 (gloo), rank 1; random selects 4 of a pool of 12 per rank")
    assert "selection 'local'" in two
    post = progress_postfix({"train/loss": 2.5, "time/step": 2.0, "time/select": 0.5})
    assert post == {"loss": "2.500", "s/step": "2.00", "select": "0.50s (25%)"}
    # a launcher that started 2 processes, each of which trains alone, is an error
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="use_cpu=True"):
        check_world(1)
    check_world(2)
