"""Two gloo processes on CPU select what one process selects, train the same model, and resume exactly.

All 2-rank runs share ONE ``torch.distributed.run`` launch of this file (its ``__main__`` runs the
configurations one after another), so torch/transformers are imported once; the 1-process
references run in the pytest process with one thread, as the ranks do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _fast import FAST

pytestmark = pytest.mark.slow

COMMON = ["train.log_selections=true", "eval.exact_match=0"]
GATHER = ["train.distributed_selection=gather", "train.max_steps=3"]
LOCAL = ["train.distributed_selection=local", "train.max_steps=4", "train.save_every=4"]

# name -> overrides; the 2-rank launch runs them in this order (the resume pairs depend on it)
TWO_RANKS = {
    "global": ["train.max_steps=4", "selection.method=stratified"],
    "global_resumed": ["train.max_steps=4", "selection.method=stratified", "train.stop_after=2"],
    "global_resumed/2": ["train.max_steps=4", "selection.method=stratified", "train.resume=true"],
    # a pool of 7: shards of 4 and 3 rows, so the all-gather pads and trims
    "gather_big_loss": [*GATHER, "selection.method=big_loss", "train.pool_size=7"],
    "gather_partitionsel": [*GATHER, "selection.method=partitionsel", "selection.features.projection_dim=64"],
    # CoLM keeps per-rank state in local mode (its Adam normaliser): resume must restore each rank's
    "local": [*LOCAL, "selection.method=colm"],
    "local_resumed": [*LOCAL, "selection.method=colm", "train.stop_after=2"],
    "local_resumed/2": [*LOCAL, "selection.method=colm", "train.resume=true"],
}
ONE_RANK = ["global", "gather_big_loss", "gather_partitionsel"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(out: Path, extra: list[str]) -> list[str]:
    return [*FAST, *COMMON, f"train.output_dir={out}", *extra]


def _run_all(spec: str) -> None:
    """The 2-rank side: run every configuration of ``spec`` (a JSON list of [out, overrides])."""
    from mixsel.config import load_config
    from mixsel.train import train

    for out, extra in json.loads(Path(spec).read_text()):
        train(load_config(None, _overrides(Path(out), extra)), progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    spec = root / "spec.json"
    spec.write_text(json.dumps([[str(root / name.split("/")[0]), extra] for name, extra in TWO_RANKS.items()]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        __file__,
        str(spec),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    from mixsel.config import load_config
    from mixsel.train import train

    root = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ONE_RANK:
            train(load_config(None, _overrides(root / name, TWO_RANKS[name])), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def _selections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "selections.jsonl").read_text().splitlines()]


def _params(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "final").state_dict()


def _assert_params_close(a: Path, b: Path, rtol: float, atol: float) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("name", ONE_RANK)
def test_two_ranks_match_one(two, one, name):
    # "global" computes everything everywhere; "gather" shards the feature work and all-gathers
    # (scalar losses for big_loss, 64-d projected gradients for PartitionSel's Grams)
    sel_two, sel_one = _selections(two / name), _selections(one / name)
    steps = next(int(o.split("=")[1]) for o in TWO_RANKS[name] if o.startswith("train.max_steps="))
    assert [s["step"] for s in sel_two] == list(range(1, steps + 1))
    assert [s["examples"] for s in sel_two] == [s["examples"] for s in sel_one]
    # the selectors' natural weights (PartitionSel's NNLS w) agree up to float rounding of the Grams
    for a, b in zip(sel_two, sel_one):
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-4, abs=1e-6)
    _assert_params_close(two / name, one / name, rtol=1e-4, atol=1e-5)


def test_gather_selection_is_model_dependent(two):
    # guards the test above against a vacuous pass: big_loss and PartitionSel pick different
    # examples from the same pools (same sampler seed), so their gathered features mattered
    a, b = _selections(two / "gather_big_loss"), _selections(two / "gather_partitionsel")
    assert a[0]["step"] == b[0]["step"] == 1
    assert [s["examples"] for s in a] != [s["examples"] for s in b]


def test_local_mode_selects_from_own_shard_and_trains(two):
    rows = _selections(two / "local")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        # k=4 over 2 ranks: rank 0 picks 2 of the even pool rows, rank 1 two of the odd ones
        assert [i % 2 for i in r["pool_index"]] == [0, 0, 1, 1]
        assert len(set(r["pool_index"])) == 4
    metrics = [json.loads(line) for line in (two / "local" / "metrics.jsonl").read_text().splitlines()]
    losses = torch.tensor([m["train/loss"] for m in metrics])
    assert bool(torch.isfinite(losses).all())
    assert losses[-1] < losses[0]
    result = json.loads((two / "local" / "result.json").read_text())
    assert torch.isfinite(torch.tensor(result["val/loss_mean"]))


def test_distributed_resume(two):
    _assert_params_close(two / "global", two / "global_resumed", rtol=1e-5, atol=1e-6)
    assert _selections(two / "global") == _selections(two / "global_resumed")


def _selector_ranks(out: Path) -> list[dict]:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=False)["selector_ranks"]


def test_local_resume_restores_every_rank(two):
    # each rank's CoLM normaliser saw different examples, so the checkpoint keeps one state per rank
    straight, resumed = _selector_ranks(two / "local"), _selector_ranks(two / "local_resumed")
    assert len(straight) == len(resumed) == 2
    assert not torch.equal(straight[0]["normalizer"]["m"], straight[1]["normalizer"]["m"])
    for a, b in zip(straight, resumed):  # resuming restored rank 1's own state, not rank 0's
        assert a["normalizer"]["step"] == b["normalizer"]["step"] == 4
        torch.testing.assert_close(a["normalizer"]["m"], b["normalizer"]["m"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["normalizer"]["v"], b["normalizer"]["v"], rtol=1e-5, atol=1e-9)
    assert _selections(two / "local") == _selections(two / "local_resumed")
    _assert_params_close(two / "local", two / "local_resumed", rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _run_all(sys.argv[1])
