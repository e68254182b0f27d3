"""scripts/build_instruct_mix.py on a tiny fake corpus: determinism, split sizes, no leaks, answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def mix():
    return load_script("scripts/build_instruct_mix.py")


def _split(i: int) -> str:
    return ("test", "validation", "train", "train", "train")[i % 5]


FUNCTION = '''def scale_{i}(values, factor=2):
    """Multiply every value by the factor and return a new list.

    More details.
    """
    out = []
    for v in values:
        out.append(v * factor + {i})
    return out

CONSTANT_{i} = {i}
'''
CLASS = '''class Box{i}:
    """A box that holds one item."""

    def __init__(self, item):
        self.item = item

    def get(self):
        return self.item + {i}
'''
OTHER = "x_{i} = {i}\ny_{i} = x_{i} + 1\nif y_{i} > 3:\n    print(y_{i})\nz_{i} = [x_{i}, y_{i}]\n"


def fake_corpus() -> list[dict]:
    """Seven domains of the embedded corpus's shape, 30 to 90 rows each (python_code largest)."""
    recs: list[dict] = []
    for i in range(60):
        a, b = i + 2, i + 5
        recs.append(
            {
                "domain": "arithmetic",
                "split": _split(i),
                "prompt": f"Ann has {a} pens and buys {b}. How many?",
                "response": f"{a} + {b} = {a + b}.\n#### {a + b}",
                "answer": str(a + b),
            }
        )
    for i in range(40):
        recs.append(
            {
                "domain": "chemistry",
                "split": _split(i),
                "prompt": f"How many atoms are in C{i + 1}H2?",
                "response": f"{i + 1} + 2 = {i + 3} atoms.\n#### {i + 3}",
                "answer": str(i + 3),
            }
        )
    for i in range(50):
        recs.append(
            {
                "domain": "dictionary",
                "split": _split(i),
                "text": f'word{i}, synonym{i} (noun): a thing number {i}; "the word{i} is here"',
            }
        )
    for i in range(90):
        template = (FUNCTION, CLASS, OTHER)[i % 3]
        recs.append({"domain": "python_code", "split": _split(i), "text": template.format(i=i)})
    for i in range(40):
        verses = " ".join(f"And verse {i}.{v} went on and on for a while." for v in range(8))
        recs.append({"domain": "scripture", "split": _split(i), "text": f"Genesis {i}:1-8\n{verses}"})
    for domain in ("legal", "tech_docs"):
        for i in range(30):
            lines = "\n".join(f"   line {j} of {domain} passage {i} with some words" for j in range(9))
            recs.append({"domain": domain, "split": _split(i), "text": lines})
    return recs


def render(instruction: str) -> str:
    return f"<user>\n{instruction}\n<assistant>\n"


def count(text: str) -> int:
    return len(text.split())


KW = {
    "render": render,
    "count": count,
    "max_tokens": 60,
    "qa_max_tokens": 60,
    "max_train": 170,
    "val": 3,
    "test": 2,
    "qa_test": 8,
}


@pytest.fixture(scope="module")
def rows(mix):
    return mix.build_mixture(fake_corpus(), seed=0, **KW)


def test_deterministic_and_seeded(mix, rows):
    again = mix.build_mixture(fake_corpus(), seed=0, **KW)
    assert json.dumps(rows) == json.dumps(again)
    other = mix.build_mixture(fake_corpus(), seed=1, **KW)
    assert json.dumps(rows) != json.dumps(other)


def test_columns_and_order(mix, rows):
    assert all(
        list(r) == ["domain", "task", "split", "prompt", "response", "answer", "instruction", "tokens"] for r in rows
    )
    ranks = [mix.SPLIT_ORDER.index(r["split"]) for r in rows]
    assert ranks == sorted(ranks)
    for r in rows:
        assert r["prompt"] == render(r["instruction"])
        assert r["response"].strip()
        assert r["tokens"] == count(r["prompt"]) + count(r["response"]) + 1 <= KW["max_tokens"]


def test_split_sizes(mix, rows):
    sizes = Counter((r["domain"], r["split"]) for r in rows)
    corpus = Counter(r["domain"] for r in fake_corpus())
    expected_train = mix.natural_train_sizes(dict(corpus), KW["max_train"])
    for domain in corpus:
        assert sizes[(domain, "test")] == (KW["qa_test"] if domain in mix.QA_DOMAINS else KW["test"])
        assert sizes[(domain, "validation")] == KW["val"]
        assert 0 < sizes[(domain, "train")] <= expected_train[domain]
    # natural proportions: the corpus sizes scaled by one factor (340 rows -> 170)
    assert expected_train["python_code"] == 3 * expected_train["legal"]
    assert sum(expected_train.values()) == pytest.approx(KW["max_train"], abs=len(corpus))
    assert sizes[("python_code", "train")] == expected_train["python_code"]
    assert sizes[("arithmetic", "train")] == expected_train["arithmetic"]


def test_no_held_out_row_in_train(rows):
    held_out = {r["instruction"] for r in rows if r["split"] != "train"}
    train = [r["instruction"] for r in rows if r["split"] == "train"]
    assert not held_out.intersection(train)
    assert len(set(train)) == len(train)
    # the corpus's own test rows are used for the test split first
    corpus_test = {r["prompt"] for r in fake_corpus() if r["split"] == "test" and r["domain"] == "arithmetic"}
    test = [r["instruction"] for r in rows if r["split"] == "test" and r["domain"] == "arithmetic"]
    assert all(t.split("\n\n")[0] in corpus_test for t in test)


def test_answers_present_and_parsable(mix, rows):
    for r in rows:
        if r["domain"] in mix.QA_DOMAINS:
            assert r["task"] == "solve" and r["answer"]
            assert r["response"].splitlines()[-1] == f"#### {r['answer']}"
            assert r["instruction"].endswith(mix.QA_SUFFIX)
        else:
            assert r["answer"] is None


def test_tasks(mix, rows):
    tasks = Counter((r["domain"], r["task"]) for r in rows)
    # functions first, then classes, then other chunks (not needed here: 30 + 30 rows are enough)
    assert {t for d, t in tasks if d == "python_code"} == {"complete_function", "complete_class", "explain_function"}
    import random

    other = mix.python_row(OTHER.format(i=1), random.Random(0))
    assert other["task"] == "continue_code" and other["instruction"].endswith("```python\nx_1 = 1\n```")
    define = next(r for r in rows if r["task"] == "define")
    assert define["instruction"].startswith('Define the noun "word')
    assert "For example:" in define["response"] and "Synonyms: synonym" in define["response"]
    for r in rows:
        if r["task"].startswith(("complete", "continue_code")):
            assert r["response"].startswith("```python\n") and r["response"].endswith("\n```")
        if r["task"] == "complete_function":  # the function only, not the constant after it
            assert "CONSTANT" not in r["response"]
    scripture = next(r for r in rows if r["domain"] == "scripture")
    assert scripture["instruction"].startswith("Continue this passage from the King James Bible (Genesis ")


def test_explain_function_answers_with_the_docstring(mix):
    import random

    rng = random.Random(0)
    rows = [mix.python_row(FUNCTION.format(i=1), rng) for _ in range(20)]
    explain = [r for r in rows if r["task"] == "explain_function"]
    assert explain and all(
        r["response"] == "Multiply every value by the factor and return a new list." for r in explain
    )
    assert all('"""' not in r["instruction"] for r in explain)


def test_long_continuations_are_cut_to_the_budget(mix):
    row = mix.passage_row("\n".join(f"line {j} " + "word " * 10 for j in range(30)), "legal")
    fitted = mix.fit_row(row, render(row["instruction"]), count, 120)
    assert fitted["tokens"] <= 120
    assert fitted["tokens"] > 120 - 12  # cut at the last line that fits
    assert fitted["response"].endswith("word")
    # a fixed answer that does not fit is left out, not cut
    qa = mix.qa_row({"prompt": "q " * 50, "response": "r\n#### 1", "answer": "1"})
    assert mix.fit_row(qa, render(qa["instruction"]), count, 40) is None


def test_too_small_domain_is_an_error(mix):
    recs = [r for r in fake_corpus() if r["domain"] != "chemistry"]
    recs += [{"domain": "chemistry", "split": "train", "prompt": "q1?", "response": "#### 1", "answer": "1"}]
    with pytest.raises(ValueError, match="chemistry"):
        mix.build_mixture(recs, seed=0, **KW)


def test_cli_without_tokenizer_folder(mix, tmp_path, capsys):
    code = mix.main(["--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "mix.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "scripts/get_smollm2.sh" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mix.jsonl").exists()
