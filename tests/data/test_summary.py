"""The data summary: exact per-domain counts on the fixture mixture, its text, and the resolved source."""

from __future__ import annotations

import os

import pytest

import _mixture
from mixsel.config import DataConfig, EvalConfig

pytest.importorskip("transformers")

EXPECTED = {
    "left": _mixture.EXPECTED_LEFT,
    "drop": {**_mixture.EXPECTED_LEFT, "algebra": (1, 1, 2, 4, 4, 4, 2)},
    "right": {**_mixture.EXPECTED_LEFT, "algebra": (3, 1, 4, 4, 4, 0, 2)},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(_mixture.write(tmp_path_factory.mktemp("mix") / "mix.jsonl"))


def _load(source, **data):
    from mixsel.data.build import load_mixture
    from mixsel.data.embedded import load_embedded_tokenizer

    return load_mixture(DataConfig(source=source, max_length=64, **data), load_embedded_tokenizer())


@pytest.mark.parametrize("truncation", ["left", "drop", "right"])
def test_counts_per_domain_and_split_are_exact(source, truncation):
    summary = _load(source, truncation=truncation).summary
    assert summary.domains == ["algebra", "chat", "dictionary", "trl"]
    got = {}
    for d in summary.domains:
        total, test = summary.total(d), summary.counts["test"][d]
        rows = tuple(summary.rows(s, d) for s in ("train", "validation", "test"))
        got[d] = (*rows, total.truncated, total.response_cut, total.dropped, test.scored)
    assert got == EXPECTED[truncation]


def test_summary_text(source):
    mixture = _load(source)
    eval_cfg = EvalConfig(max_new_tokens=8, answer_checker={"algebra": "sympy", "chat": "exact"})
    from mixsel.data.summary import format_data_summary

    text = format_data_summary(mixture.summary, eval_cfg)
    assert text.splitlines() == [
        f"data: {os.path.abspath(source)}",
        "4 domains, max_length=64, truncation=left, prompt and response joined by separator '\\n'",
        "  domain      kind             train  val  test  truncated  response cut  dropped     scored",
        "  algebra     prompt/response      3    1     4    4 (50%)             2        0  3 (sympy)",
        "  chat        prompt/response      2    1     2          0             0        0  2 (exact)",
        "  dictionary  text                 6    1     2    3 (33%)             -        0          -",
        "  trl         prompt/response      2    1     2          0             0        0  1 (gsm8k)",
        "warning: eval.max_new_tokens=8 < 20 tokens, the longest test reference of 'algebra': raise it, or those "
        "answers cannot be generated",  # the chat references (7 tokens at most) fit
    ]
    assert "warning" not in format_data_summary(mixture.summary, EvalConfig(max_new_tokens=96))
    assert "(gsm8k)" not in format_data_summary(mixture.summary)  # without eval settings: counts only
    with pytest.raises(ValueError, match=r"eval.answer_checker='symp' is neither a built-in checker"):
        format_data_summary(mixture.summary, EvalConfig(answer_checker="symp"))


def test_resolved_sources(tmp_path, monkeypatch):
    from mixsel.data.build import resolve_source

    assert resolve_source(DataConfig()).startswith("embedded (") and "corpus.jsonl.gz" in resolve_source(DataConfig())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("")
    assert resolve_source(DataConfig(source="d.jsonl")) == str(tmp_path / "d.jsonl")
    assert resolve_source(DataConfig(source="org/name", format="hf", hf_split="train")) == (
        "Hugging Face dataset org/name, split=train"
    )


def test_the_summary_survives_the_disk_cache(source, tmp_path):
    from mixsel.data import build
    from mixsel.data.embedded import load_embedded_tokenizer

    cfg = DataConfig(source=source, max_length=64)
    build._MEMO.clear()  # other tests loaded the same data in memory
    first = build.load_mixture(cfg, load_embedded_tokenizer(), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*/manifest.json"))) == 1  # one prepared store
    build._MEMO.clear()
    cached = build.load_mixture(cfg, load_embedded_tokenizer(), cache_dir=str(tmp_path))
    assert cached is not first and cached.summary == first.summary
    assert cached.test.answers == first.test.answers
