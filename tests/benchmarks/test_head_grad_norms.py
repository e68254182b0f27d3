"""benchmarks/head_grad_norms.py: per-example LM-head gradient norms against a per-example backward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from _fast import FAST
from _scripts import load_script

head_grad_norms = load_script("benchmarks/head_grad_norms.py")


def test_summarize_by_hand():
    # deciles of 1..9 by the "exclusive" method: the first is 1.0, the last 9.0
    assert head_grad_norms.summarize([float(x) for x in range(1, 10)]) == {
        "mean": 5.0,
        "median": 5.0,
        "p10": 1.0,
        "p90": 9.0,
    }
    assert head_grad_norms.summarize([2.5]) == {"mean": 2.5, "median": 2.5, "p10": 2.5, "p90": 2.5}


def _oracle(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per example: ||d mean-token-loss / d W_head|| by its own backward, and that loss."""
    head = model.get_output_embeddings()
    norms, losses = [], []
    for i in range(batch["input_ids"].shape[0]):
        ids, mask, labels = (batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels"))
        with torch.no_grad():
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        weight = head.weight.detach().double().requires_grad_(True)
        logits = h @ weight.T
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        (grad,) = torch.autograd.grad(loss, weight)
        norms.append(float(grad.norm()))
        losses.append(float(loss.detach()))
    return norms, losses


def test_head_stats_match_a_per_example_backward():
    pytest.importorskip("transformers")
    from mixsel.config import load_config
    from mixsel.data.build import load_mixture
    from mixsel.model import build_model, build_tokenizer

    cfg = load_config(None, FAST)
    tokenizer = build_tokenizer(cfg.model)
    split = load_mixture(cfg.data, tokenizer, seed=0).train
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer).eval()
    rows = split.indices_of(0)[:5]
    stats = head_grad_norms.head_stats(model, split, rows, tokenizer.pad_token_id, batch_size=2)
    batch = split.collate(rows, tokenizer.pad_token_id)
    norms, losses = _oracle(model, batch)
    assert stats["grad_norm"] == pytest.approx(norms, rel=1e-4)
    assert stats["loss"] == pytest.approx(losses, rel=1e-4)
    assert stats["target_tokens"] == (batch["labels"][:, 1:] != -100).sum(1).tolist()


def test_one_short_run(tmp_path):
    pytest.importorskip("transformers")
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 0\n")
    out = tmp_path / "norms.json"
    result = head_grad_norms.main(["--config", str(config), "--per-domain", "3", "--out", str(out), *FAST])
    assert json.loads(out.read_text()) == result
    assert len(result["domains"]) == 7
    for stats in result["domains"].values():
        assert stats["rows"] == 3
        assert 0 < stats["grad_norm"]["p10"] <= stats["grad_norm"]["median"] <= stats["grad_norm"]["p90"]
