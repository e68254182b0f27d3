"""Scale-out paths on CPU: an FSDP-wrapped model gives the same selection features; bf16 trains.

FSDP (``torch.distributed.fsdp.fully_shard``) runs here in a 1-process gloo group: parameters become
DTensors, so anything reading ``param.grad`` would see shards, while mixsel's features come from
hooks on local activations (LM-head inputs and output errors, captured ``nn.Linear`` factors) and
must be unchanged by the wrapping.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist

from _fast import FAST
from conftest import make_batch, make_tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gloo():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def models(gloo):
    """(plain, FSDP-wrapped) copies of the same tiny Llama."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    plain, wrapped = make_tiny_llama(seed=3), make_tiny_llama(seed=3)
    mesh = init_device_mesh("cpu", (1,))
    for layer in wrapped.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    assert isinstance(wrapped, FSDPModule)
    assert type(wrapped.lm_head.weight).__name__ == "DTensor"  # really sharded parameters
    return plain, wrapped


def test_per_example_loss_unchanged(models):
    from mixsel.features.loss import per_example_loss

    plain, wrapped = models
    batch = make_batch(n=5, seed=1)
    with torch.no_grad():
        a = per_example_loss(
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        b = per_example_loss(
            wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    assert a.shape == (5,) and bool((a > 0).all())
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "kwargs"),
    [
        ("lm_head", {"method": "ghost"}),
        ("lm_head", {"method": "materialize"}),
        ("lm_head", {"projection_dim": 16}),
        ("linear", {}),
        ("linear", {"projection_dim": 16, "normalize": True}),
    ],
)
def test_pool_gradient_features_unchanged(models, source, kwargs):
    from mixsel.features import pool_gradient_features

    plain, wrapped = models
    pool, val = make_batch(n=6, seed=2), make_batch(n=2, seed=5)
    need = ("gram", "val_scores", "val_gram", "grad_norm", "loss")
    if "projection_dim" in kwargs or kwargs.get("method") == "materialize":
        need = (*need, "grads")
    a = pool_gradient_features(plain, pool, val, source=source, need=need, **kwargs)
    b = pool_gradient_features(wrapped, pool, val, source=source, need=need, **kwargs)
    assert a.keys() == b.keys() == set(need)
    assert float(a["gram"].abs().max()) > 0 and a["gram"].shape == (6, 6)
    for name in need:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_backward_matches_plain(models):
    # the train step's path: weighted per-example loss, backward, gradients (DTensors) equal the plain ones
    from mixsel.features.loss import per_example_loss

    plain, wrapped = models
    batch = make_batch(n=4, seed=7)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    for model in (plain, wrapped):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (per_example_loss(logits, batch["labels"]) * w).sum().div(w.sum()).backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7, msg=name)
    plain.zero_grad(set_to_none=True)
    wrapped.zero_grad(set_to_none=True)


# ---- bf16 ----------------------------------------------------------------------------------------


def _train_rows(tmp_path, *extra):
    from mixsel.config import load_config
    from mixsel.train import train

    cfg = load_config(None, [*FAST, f"train.output_dir={tmp_path}", "train.max_steps=3", "eval.exact_match=0", *extra])
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_bf16_autocast_trains(tmp_path, monkeypatch):
    import mixsel.model as model_mod

    seen: list[tuple[bool, torch.dtype]] = []
    build = model_mod.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(
            lambda _m, _i, out: seen.append((torch.is_autocast_enabled("cpu"), out.logits.dtype))
        )
        return model

    monkeypatch.setattr(model_mod, "build_model", spy)
    result, rows = _train_rows(tmp_path, "train.autocast=bf16", "train.device=cpu", "selection.method=big_loss")
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert torch.isfinite(torch.tensor(result["val/loss_mean"]))
    # train forwards (one per step) ran in bf16 under autocast; selection features and evaluation did not
    autocast = [dtype for enabled, dtype in seen if enabled]
    assert autocast == [torch.bfloat16] * 3
    assert all(dtype == torch.float32 for enabled, dtype in seen if not enabled)


def test_bf16_weights_train(tmp_path):
    result, rows = _train_rows(tmp_path, "model.dtype=bfloat16", "selection.method=partitionsel")
    losses = torch.tensor([r["train/loss"] for r in rows])
    assert bool(torch.isfinite(losses).all()) and torch.isfinite(torch.tensor(result["val/loss_mean"]))


def test_autocast_rejects_fp16(tmp_path):
    from mixsel.config import load_config
    from mixsel.train import train

    with pytest.raises(ValueError, match="train.autocast"):
        train(load_config(None, [*FAST, f"train.output_dir={tmp_path}", "train.autocast=fp16"]), progress=False)
