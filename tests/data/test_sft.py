"""The Hugging Face route's datasets: the same tokenisation as mixsel train, prompt masking, per-domain splits."""

from __future__ import annotations

import pytest

import _mixture
from mixsel.config import DataConfig

pytest.importorskip("datasets")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    from mixsel.data.embedded import load_embedded_tokenizer

    return load_embedded_tokenizer()


def test_datasets_from_a_file_match_mixsel_train_exactly(tmp_path, tok):
    from mixsel.data.build import load_mixture_records, tokenize_mixture
    from mixsel.data.sft import sft_datasets

    cfg = DataConfig(source=str(_mixture.write(tmp_path / "mix.jsonl")), max_length=64)
    data = sft_datasets(tok, cfg)
    assert data.domains == ["algebra", "chat", "dictionary", "trl"]
    assert data.train.column_names == ["input_ids", "labels", "domain"]
    assert [len(data.train), len(data.validation), len(data.test)] == [13, 4, 10]
    assert sorted(data.validation["domain"]) == data.domains  # one validation row per domain (the split column)
    fresh = tokenize_mixture(load_mixture_records(cfg), tok, cfg)  # what mixsel train trains on
    assert data.train["input_ids"] == [x.tolist() for x in fresh.train.input_ids]
    assert data.train["labels"] == [y.tolist() for y in fresh.train.labels]
    row = data.test[2]  # "How many diagonals has an n-gon?": prompt masked, response and eos are targets
    start = next(i for i, y in enumerate(row["labels"]) if y != -100)
    assert tok.decode(row["input_ids"][:start]) == "How many diagonals has an n-gon?\n"
    assert tok.decode(row["input_ids"][start:]) == "Each vertex sees n-3.\n#### n(n-3)/2<|endoftext|>"
    assert data.summary.counts["test"]["algebra"].scored == 3


def test_rows_in_memory_a_dataset_and_a_dataset_dict(tok):
    import datasets

    from mixsel.data.sft import sft_datasets
    from mixsel.integrations.hf_utils import CausalLMCollator, DomainCollator

    rows = [{"topic": "a" if i % 2 else "b", "prompt": f"q{i}", "completion": f" r{i}"} for i in range(20)]
    cfg = DataConfig(domain_column="topic", max_length=32, val_per_domain=2, test_per_domain=1)
    from_list = sft_datasets(tok, cfg, rows=rows)
    assert [len(from_list.train), len(from_list.validation), len(from_list.test)] == [14, 4, 2]
    assert sorted(from_list.validation["domain"]) == ["a", "a", "b", "b"]
    from_ds = sft_datasets(tok, cfg, rows=datasets.Dataset.from_list(rows))
    assert from_ds.train["input_ids"] == from_list.train["input_ids"]
    by_split = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:16]), "test": datasets.Dataset.from_list(rows[16:])}
    )
    kept = sft_datasets(tok, cfg, rows=by_split)  # the given test split is kept; validation is carved from train
    assert len(kept.test) == 4 and len(kept.validation) == 4 and len(kept.train) == 12
    collate = DomainCollator(CausalLMCollator(tok.pad_token_id), "domain", kept.domains)
    batch = collate([kept.train[0], kept.train[1]])
    assert batch["domain"].tolist() == [kept.domains.index(d) for d in kept.train["domain"][:2]]
    assert (batch["labels"][:, 0] == -100).all()  # the prompt is masked


def test_chat_template_rows():
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.data.sft import sft_datasets

    chat = load_embedded_tokenizer()  # a fresh one: the shared fixture keeps no template
    chat.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    chat.chat_template += "{% if add_generation_prompt %}[assistant] {% endif %}"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [{"domain": "c", "messages": conv, "split": s} for s in ("train", "validation", "test")]
    data = sft_datasets(chat, DataConfig(max_length=32), rows=rows)
    row = data.train[0]
    start = next(i for i, y in enumerate(row["labels"]) if y != -100)
    assert chat.decode(row["input_ids"][:start]) == "[user] Hi\n[assistant] "
    assert chat.decode(row["input_ids"][start:]) == "Hello\n"
    assert data.summary.formatting == "chat template"
