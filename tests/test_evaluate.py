"""Exact match by batched greedy generation against one-at-a-time decoding, and per-domain losses."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def _split_and_model():
    from mixsel.config import DataConfig, ModelConfig
    from mixsel.data.build import load_mixture
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.model import build_model

    tok = load_embedded_tokenizer()
    mix = load_mixture(DataConfig(max_length=64, max_train_per_domain=10, val_per_domain=4, test_per_domain=4), tok)
    torch.manual_seed(0)
    model = build_model(ModelConfig(config_file="embedded:micro-llama", attn_implementation="eager"), tok).eval()
    return tok, mix.test, model


def test_batched_generation_equals_single(monkeypatch):
    import mixsel.answers as answers
    from mixsel.evaluate import exact_match

    tok, split, model = _split_and_model()
    seen: dict[str, list[str]] = {}

    def record(batch_size):
        texts: list[str] = []
        monkeypatch.setattr(answers, "is_correct", lambda text, answer: texts.append(text) or True)
        out = exact_match(model, tok, split, limit=5, max_new_tokens=6, batch_size=batch_size)
        seen[batch_size] = texts
        return out

    batched, single = record(5), record(1)
    assert batched == single and all(v == 1.0 for v in batched.values())
    assert seen[5] == seen[1] and len(seen[1]) >= 5
    # with a greedy decode of an untrained model the real scorer finds nothing right
    monkeypatch.undo()
    assert all(v == 0.0 for v in exact_match(model, tok, split, limit=3, max_new_tokens=4).values())


def test_domain_losses_match_manual():
    from mixsel.evaluate import domain_losses
    from mixsel.features.loss import per_example_loss

    tok, split, model = _split_and_model()
    out = domain_losses(model, split, pad_token_id=tok.pad_token_id, batch_size=3, max_per_domain=4, prefix="t")
    d = 0
    idx = split.indices_of(d)[:4]
    batch = split.collate(idx, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = float(per_example_loss(logits, batch["labels"]).mean())
    assert out[f"t/loss/{split.domains[d]}"] == pytest.approx(expected, rel=1e-5)
    assert out["t/loss_worst"] == max(v for k, v in out.items() if k.startswith("t/loss/"))
