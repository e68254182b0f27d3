"""The embedded default corpus and tokenizer: schema, splits, sizes, offline round trip, determinism."""

from __future__ import annotations

import collections
import hashlib
import json

import pytest

from mixsel.answers import extract_answer
from mixsel.data.embedded import (
    EMBEDDED_DIR,
    EMBEDDED_DOMAINS,
    QA_DOMAINS,
    SPLITS,
    embedded_tokenizer_path,
    load_embedded_records,
    load_embedded_tokenizer,
    record_text,
)

from _scripts import load_script


@pytest.fixture(scope="module")
def records():
    return load_embedded_records()


@pytest.fixture(scope="module")
def build():
    return load_script("scripts/build_corpus.py")


@pytest.fixture(scope="module")
def stats():
    return json.loads((EMBEDDED_DIR / "stats.json").read_text())


def test_schema(records):
    text_keys = {"domain", "split", "text"}
    qa_keys = {"domain", "split", "prompt", "response", "answer"}
    for r in records:
        assert r["domain"] in EMBEDDED_DOMAINS and r["split"] in SPLITS
        if r["domain"] in QA_DOMAINS:
            assert set(r) == qa_keys, r
            assert r["prompt"].strip() and r["response"].strip() and r["answer"].strip()
            assert r["response"].splitlines()[-1].startswith("#### ")
            assert extract_answer(r["response"]) == r["answer"]
        else:
            assert set(r) == text_keys, r
            assert len(r["text"].strip()) >= 40
        assert all(isinstance(v, str) for v in r.values())


def test_every_domain_in_every_split_with_eval_sizes(records):
    counts = collections.Counter((r["domain"], r["split"]) for r in records)
    assert len(EMBEDDED_DOMAINS) >= 5
    for d in EMBEDDED_DOMAINS:
        assert 32 <= counts[d, "validation"] <= 64
        assert counts[d, "test"] == counts[d, "validation"]
        assert counts[d, "train"] >= 60
    assert set(counts) == {(d, s) for d in EMBEDDED_DOMAINS for s in SPLITS}


def test_splits_disjoint_and_no_duplicates(records):
    by_split = {s: {record_text(r) for r in records if r["split"] == s} for s in SPLITS}
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    assert sum(map(len, by_split.values())) == len(records)  # no duplicate anywhere
    prompts = [r["prompt"] for r in records if "prompt" in r]
    assert len(set(prompts)) == len(prompts)


def test_domain_sizes_very_unequal(records, stats):
    sizes = collections.Counter(r["domain"] for r in records)
    assert max(sizes.values()) / min(sizes.values()) >= 30
    tokens = {d: sum(stats["domains"][d][s]["tokens"] for s in SPLITS) for d in EMBEDDED_DOMAINS}
    assert max(tokens.values()) / min(tokens.values()) >= 30
    assert [sizes[d] for d in EMBEDDED_DOMAINS] == sorted(sizes.values(), reverse=True)


def test_stats_match_the_files(records, stats):
    corpus = EMBEDDED_DIR / "corpus.jsonl.gz"
    assert stats["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    counts = collections.Counter((r["domain"], r["split"]) for r in records)
    for d in EMBEDDED_DOMAINS:
        for s in SPLITS:
            assert stats["domains"][d][s]["examples"] == counts[d, s]
        assert stats["domains"][d]["tokens_per_example"]["max"] <= 256
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir() if p.is_file())
    assert total <= 20 * 2**20


def test_qa_domains_are_exactly_the_generators_output(records, build):
    # the generators live next to the build script (scripts/corpus/), which imports them
    seed, sizes = build.SEED, build.TARGET_SIZE
    arith = {(p["prompt"], p["response"], p["answer"]) for p in build.generate_problems(sizes["arithmetic"], seed=seed)}
    chem = {(q["prompt"], q["response"], q["answer"]) for q in build.generate_questions(sizes["chemistry"], seed=seed)}
    for r in records:
        if r["domain"] in QA_DOMAINS:
            triple = (r["prompt"], r["response"], r["answer"])
            assert triple in (arith if r["domain"] == "arithmetic" else chem)


def test_load_records_filters_copies_and_rejects_bad_split(records):
    val = load_embedded_records("validation")
    assert val and all(r["split"] == "validation" for r in val)
    assert val == [r for r in records if r["split"] == "validation"]
    val[0]["domain"] = "mutated"
    assert load_embedded_records("validation")[0]["domain"] != "mutated"
    with pytest.raises(ValueError, match="split must be one of"):
        load_embedded_records("dev")


def test_tokenizer_loads_offline_and_round_trips(monkeypatch, records):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_embedded_tokenizer()
    assert len(tok) == 4096
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    samples = [record_text(r) for r in records if r["split"] == "test"][::16]
    samples.append("def f(x):\n\treturn x ** 2  # Ünïcödé, 中文, emoji 🙂\r\n")
    for text in samples:
        ids = tok(text)["input_ids"]
        assert tok.eos_token_id not in ids  # no special tokens are added implicitly
        assert tok.decode(ids) == text
    batch = tok(["a b", "a much longer line of text"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id  # right padding


def test_examples_fit_in_256_tokens(records):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(embedded_tokenizer_path()))
    texts = [record_text(r) for r in records if r["split"] != "train"]
    assert max(len(e.ids) for e in tok.encode_batch(texts)) <= 256


def test_split_long_and_pack_respect_limits(build):
    text = "First line here.\nSecond one. With two sentences.\n" + "word " * 60
    pieces = build.split_long(text, 40)
    assert all(len(p) <= 40 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())  # nothing lost
    assert build.pack(["ab", "cd", "ef"], 5, "-") == ["ab-cd", "ef"]
    assert build.split_long("x" * 10, 4) == ["xxxx", "xxxx", "xx"]


def test_build_records_deterministic_disjoint_split(build):
    items = {d: [f"{d} example number {i} with some padding text" for i in range(130)] for d in EMBEDDED_DOMAINS}
    items["arithmetic"] = [{"prompt": f"q{i}", "response": f"#### {i}", "answer": str(i)} for i in range(130)]
    a, b = build.build_records(items), build.build_records(items)
    assert a == b
    for d in EMBEDDED_DOMAINS:
        mine = [r for r in a if r["domain"] == d]
        texts = {s: {record_text(r) for r in mine if r["split"] == s} for s in SPLITS}
        assert [len(texts[s]) for s in SPLITS] == [66, 32, 32]
        expected = {x if isinstance(x, str) else record_text(x) for x in items[d]}
        assert set().union(*texts.values()) == expected


def test_build_records_rejects_too_small_domain(build):
    items = {d: [f"{d} text {i} padded to be long enough" for i in range(200)] for d in EMBEDDED_DOMAINS}
    items["legal"] = items["legal"][:100]
    with pytest.raises(ValueError, match="'legal' has only 100 examples"):
        build.build_records(items)


@pytest.mark.slow
def test_tokenizer_retrains_identically(records, build):
    train = [record_text(r) for r in records if r["split"] == "train"]
    tok = build.train_tokenizer(iter(train), len(train))
    assert tok.to_str(pretty=True) + "\n" == embedded_tokenizer_path().read_text(encoding="utf-8")
