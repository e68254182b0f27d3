"""The documented 2-process CPU launch really runs two ranks: ``accelerate launch --config_file
configs/accelerate/cpu2.yaml`` of SelectionTrainer, SelectionSFTTrainer and ``mixsel train`` (gloo),
checked from what each rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "two_ranks.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cpu2_config_runs_two_ranks(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "cpu2.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    # without the datasets progress bars, so that a failing rank's traceback shows
    errors = "\n".join(line for line in proc.stderr.splitlines() if "examples/s]" not in line)
    assert proc.returncode == 0, errors[-6000:]
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(reports) == [0, 1]
    for rank, report in reports.items():
        assert report["world_size"] == 2 and report["hf_world_size"] == 2
        assert report.get("sft_world_size", 2) == 2
        loops = 3 if "sft_world_size" in report else 2
        lines = report["launch_lines"]
        assert len(lines) == loops and all("world size 2" in line and f"rank {rank}" in line for line in lines)
        # the Trainer's composition is all-reduced over 2 ranks x 4 selected rows: multiples of 1/8
        assert report["hf_frac"] and all(abs(f * 8 - round(f * 8)) < 1e-9 for f in report["hf_frac"])
    assert reports[0]["hf_frac"] == reports[1]["hf_frac"]
    # 2 ranks x 2 rows reproduce the 1-process golden run of 4 rows (picks, losses, weights)
    sys.path.insert(0, str(ROOT / "tests" / "parity"))
    from test_parity_trainers import RECORDED, _check

    assert sorted(reports[0]["parity"]) == ["partitionsel/uniform", "random/dograph", "random/static"]
    for name, got in reports[0]["parity"].items():
        _check(got, RECORDED[name])
    assert sorted(reports[0]["parity_gather"]) == ["big_loss/uniform", "hidden_fl/dograph"]
    for name, got in reports[0]["parity_gather"].items():
        _check(got, RECORDED[name])
