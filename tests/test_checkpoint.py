import torch

from mixsel.checkpoint import load_checkpoint, save_checkpoint


def test_atomic_save_and_recover(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, {"step": 1, "x": torch.arange(3)})
    save_checkpoint(tmp_path, {"step": 2, "x": torch.arange(4)})
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and state["x"].tolist() == [0, 1, 2, 3]
    # a crash between the two renames leaves only the old copy: it is recovered
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")
    assert load_checkpoint(tmp_path)["step"] == 2
    assert not (tmp_path / ".checkpoint.tmp").exists()
