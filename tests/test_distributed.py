"""Two gloo processes on CPU give the same selections and (within float tolerance) the same model as one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from _fast import FAST

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(nproc: int, out, *extra: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "-m",
        "mixsel",
        "train",
        "--quiet",
        *FAST,
        f"train.output_dir={out}",
        "train.log_selections=true",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _selections(out):
    return [json.loads(line)["examples"] for line in (out / "selections.jsonl").read_text().splitlines()]


def _params(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "final").state_dict()


@pytest.mark.parametrize("method", ["stratified"])
def test_two_ranks_match_one(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(1, one, "train.max_steps=4", f"selection.method={method}")
    _run(2, two, "train.max_steps=4", f"selection.method={method}")
    assert _selections(one) == _selections(two)
    a, b = _params(one), _params(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_distributed_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(2, straight, "train.max_steps=4")
    _run(2, resumed, "train.max_steps=4", "train.stop_after=2")
    _run(2, resumed, "train.max_steps=4", "train.resume=true")
    a, b = _params(straight), _params(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
