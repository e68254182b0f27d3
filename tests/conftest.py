"""Shared tiny, deterministic fixtures: a 2-layer Llama built from a config and a padded batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(2)
# one prepared-data cache for the whole session (and the CLI runs it starts), never the user's
os.environ.setdefault("MIXSEL_CACHE", tempfile.mkdtemp(prefix="mixsel-test-cache-"))


def make_tiny_llama(vocab_size: int = 97, hidden_size: int = 32, layers: int = 2, dtype=torch.float32, seed: int = 0):
    """A tiny random-init LlamaForCausalLM (no hub access). Untied LM head, eager attention."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def make_batch(n: int = 6, seq_len: int = 12, vocab_size: int = 97, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch with varying lengths and prompt tokens masked with -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (n, seq_len), generator=g)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    for i in range(n):
        length = seq_len - (i % 4)  # varying padding
        prompt = 1 + (i % 3)  # varying masked prompt
        attention_mask[i, :length] = 1
        labels[i, prompt:length] = input_ids[i, prompt:length]
        input_ids[i, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama64():
    return make_tiny_llama(dtype=torch.float64)


@pytest.fixture
def tiny_batch():
    return make_batch()
