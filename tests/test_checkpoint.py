"""Checkpoints: atomic rotation, checksums, fallback to the previous one, full disks, weights_only."""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from mixsel.checkpoint import (
    load_checkpoint,
    read_manifest,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _two(tmp_path):
    save_checkpoint(tmp_path, {"step": 1, "x": torch.arange(3)}, meta={"fingerprint": "a"})
    save_checkpoint(tmp_path, {"step": 2, "x": torch.arange(4)}, meta={"fingerprint": "a"})


def test_latest_and_previous_are_kept(tmp_path):
    assert load_checkpoint(tmp_path) is None
    _two(tmp_path)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and state["x"].tolist() == [0, 1, 2, 3]
    assert read_manifest(tmp_path / "checkpoint")["step"] == 2
    assert read_manifest(tmp_path / "checkpoint.prev")["step"] == 1
    assert read_manifest(tmp_path / "checkpoint")["fingerprint"] == "a"
    assert not (tmp_path / ".checkpoint.tmp").exists()


def test_crash_between_the_renames_falls_back(tmp_path, caplog):
    _two(tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.tmp")  # as if killed before the last rename
    with caplog.at_level("WARNING"):
        assert load_checkpoint(tmp_path)["step"] == 1
    assert "previous checkpoint (step 1)" in caplog.text
    remove_leftovers(tmp_path)
    assert not (tmp_path / ".checkpoint.tmp").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_damaged_latest_falls_back_with_a_warning(tmp_path, caplog, damage):
    _two(tmp_path)
    path = tmp_path / "checkpoint" / "state.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        (tmp_path / "checkpoint" / "manifest.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        assert load_checkpoint(tmp_path)["step"] == 1
    assert "resuming from the previous checkpoint" in caplog.text


def test_no_intact_checkpoint_is_an_error(tmp_path):
    _two(tmp_path)
    for name in ("checkpoint", "checkpoint.prev"):
        (tmp_path / name / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no intact checkpoint.*--overwrite"):
        load_checkpoint(tmp_path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _two(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"step-3 checkpoint .*no space left on device.*\(step 2\).* is intact"):
        save_checkpoint(tmp_path, {"step": 3, "x": torch.arange(5)})
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before
    assert not (tmp_path / ".checkpoint.tmp").exists()


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    """A state.pt that carries pickled code, with a manifest that matches it, is refused unread."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    save_checkpoint(tmp_path, {"step": 1, "x": Evil()})
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trip_and_identical_bytes(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    # two saves of the same state are the same bytes (so identical runs have identical checkpoints)
    for name in ("a", "b"):
        set_rng_state(state)
        save_checkpoint(tmp_path / name, {"step": 1, "rng": rng_state(), "w": torch.ones(3)})
    manifests = [json.loads((tmp_path / n / "checkpoint" / "manifest.json").read_text()) for n in ("a", "b")]
    assert manifests[0]["files"] == manifests[1]["files"]
