"""Loading multi-domain data from JSONL / Parquet / CSV / Hugging Face datasets, and splitting it."""

from __future__ import annotations

import gzip
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from mixsel.data.loading import domain_names, load_records, select_domains, split_records

ROWS = [
    {"source": "code", "body": "def f(x): return x", "gold": None, "part": "train"},
    {"source": "prose", "body": "The cat sat on the mat.", "gold": None, "part": "train"},
    {"source": "code", "body": "import os", "gold": None, "part": "test"},
    {"source": "math", "body": "2 + 3 = 5", "gold": "5", "part": "validation"},
    {"source": "math", "body": "4 + 4 = 8", "gold": "8", "part": "train"},
]
EXPECTED = [
    {"domain": "code", "text": "def f(x): return x"},
    {"domain": "prose", "text": "The cat sat on the mat."},
    {"domain": "code", "text": "import os"},
    {"domain": "math", "text": "2 + 3 = 5", "answer": "5"},
    {"domain": "math", "text": "4 + 4 = 8", "answer": "8"},
]
MAPPING = {"domain_column": "source", "text_column": "body", "answer_column": "gold"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ---- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_round_trip(tmp_path, name):
    path = write_jsonl(tmp_path / name, ROWS)
    assert load_records(str(path), **MAPPING) == EXPECTED


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert load_records(str(path), **MAPPING) == EXPECTED


def test_parquet_round_trip(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    assert load_records(str(path), **MAPPING) == EXPECTED


def test_csv_round_trip_keeps_strings(tmp_path):
    rows = [{**r, "gold": r["gold"] or ""} for r in ROWS]
    rows[3]["gold"] = "007"  # a CSV reader that guessed types would turn this into 7
    path = write_csv(tmp_path / "d.csv", rows)
    records = load_records(str(path), **MAPPING)
    assert [r["text"] for r in records] == [r["text"] for r in EXPECTED]
    assert records[3]["answer"] == "007"
    assert records[4]["answer"] == "8"
    assert "answer" not in records[0]  # an empty CSV cell is no answer


def test_folder_and_glob_read_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_records(str(tmp_path), **MAPPING) == EXPECTED
    assert load_records(str(tmp_path / "*.jsonl"), **MAPPING) == EXPECTED


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved"), **MAPPING) == EXPECTED


def test_hf_saved_dataset_dict_keeps_split_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:3]), "validation": datasets.Dataset.from_list(ROWS[3:])}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    records = load_records(str(tmp_path / "saved"), **MAPPING)
    assert [r["split"] for r in records] == ["train"] * 3 + ["validation"] * 2
    only_val = load_records(str(tmp_path / "saved"), **MAPPING, hf_split="validation")
    assert [r["text"] for r in only_val] == ["2 + 3 = 5", "4 + 4 = 8"]
    assert all("split" not in r for r in only_val)


def test_hf_local_data_files_use_load_dataset_builder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records(str(path), format="hf", **MAPPING) == EXPECTED
    assert calls == [(("json",), {"data_files": [str(path)], "split": "train"})]


def test_hf_local_data_files_real_builder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    assert load_records(str(path), format="hf", **MAPPING) == EXPECTED


def test_hub_name_calls_load_dataset_with_config_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/mixture", format="hf", hf_config="main", hf_split="train", **MAPPING)
    assert records == EXPECTED
    assert calls == [(("someone/mixture", "main"), {"split": "train"})]
    calls.clear()
    load_records("ignored", hf_name="someone/other", **MAPPING)
    assert calls == [(("someone/other", None), {"split": None})]


def test_hub_dataset_dict_with_unknown_split_names_asks_for_hf_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train_sft": datasets.Dataset.from_list(ROWS[:2]), "test_sft": datasets.Dataset.from_list(ROWS[2:])}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    with pytest.raises(ValueError, match=r"data\.hf_split=<name>") as err:
        load_records("someone/chat", format="hf", **MAPPING)
    assert "train_sft" in str(err.value)


# ---- column mapping -----------------------------------------------------------------------------


def test_prompt_response_mapping_and_split_column(tmp_path):
    rows = [
        {"cat": "qa", "q": "What is 2+2?", "a": "4", "ans": 4, "which": "dev"},
        {"cat": "qa", "q": "What is 3+3?", "a": "6", "ans": 6, "which": "train"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = load_records(
        str(path),
        domain_column="cat",
        prompt_column="q",
        response_column="a",
        answer_column="ans",
        split_column="which",
    )
    assert records == [
        {"domain": "qa", "prompt": "What is 2+2?", "response": "4", "answer": "4", "split": "validation"},
        {"domain": "qa", "prompt": "What is 3+3?", "response": "6", "answer": "6", "split": "train"},
    ]
    only_train = load_records(
        str(path), domain_column="cat", prompt_column="q", response_column="a", split_column="which", split="train"
    )
    assert [r["prompt"] for r in only_train] == ["What is 3+3?"]


def test_default_columns_are_detected(tmp_path):
    rows = [{"domain": "d", "prompt": "p", "response": "r", "answer": "1", "split": "test"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_records(str(path)) == rows


def test_one_file_may_mix_plain_text_and_instruction_rows(tmp_path):
    rows = [
        {"domain": "prose", "text": "a b", "split": "train"},
        {"domain": "math", "prompt": "1+1?", "response": "2", "answer": "2", "split": "test"},
        {"domain": "math", "prompt": "", "response": "3", "text": "ignored", "split": "train"},
    ]
    records = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert records == [
        {"domain": "prose", "text": "a b", "split": "train"},
        {"domain": "math", "prompt": "1+1?", "response": "2", "answer": "2", "split": "test"},
        {"domain": "math", "prompt": "", "response": "3", "split": "train"},
    ]


def test_integer_domains_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": 3, "text": "a"}, {"domain": 10, "text": "b"}])
    records = load_records(str(path))
    assert [r["domain"] for r in records] == ["3", "10"]
    assert domain_names(records) == ["10", "3"]


def test_empty_texts_are_dropped_with_a_count(tmp_path):
    rows = [{"domain": "a", "text": "x"}, {"domain": "a", "text": "  "}, {"domain": "b", "text": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match=r"dropped 1 rows with an empty text \('text'\) \(per domain: \{'a': 1\}\)"):
        records = load_records(str(path))
    assert [r["text"] for r in records] == ["x", "y"]


# ---- TRL's column conventions -------------------------------------------------------------------


def test_prompt_completion_columns_are_instruction_data(tmp_path):
    rows = [
        {"domain": "m", "prompt": "1+1?", "completion": "2\n#### 2"},
        {"domain": "m", "prompt": "note", "completion": "", "text": "plain row"},
    ]
    assert load_records(str(write_jsonl(tmp_path / "d.jsonl", rows))) == [
        {"domain": "m", "prompt": "1+1?", "response": "2\n#### 2"},
        {"domain": "m", "text": "plain row"},
    ]
    ours = {"domain": "n", "prompt": "2+2?", "response": "4"}  # one file may hold both conventions
    assert load_records(str(write_jsonl(tmp_path / "e.jsonl", [*rows, ours])))[-1] == ours


def test_messages_rows_split_at_the_last_assistant_turn(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},  # after the last assistant turn: left out
    ]
    rows = [
        {"domain": "chat", "messages": chat},
        {"domain": "chat", "messages": [{"role": "user", "content": "no reply"}]},  # no assistant turn: dropped
        {"domain": "chat", "messages": None, "text": "plain"},
    ]
    with pytest.warns(UserWarning, match=r"dropped 1 rows .*assistant turn \('messages'\).*\{'chat': 1\}"):
        records = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert records == [
        {"domain": "chat", "messages": chat[:4], "response": "4"},
        {"domain": "chat", "text": "plain"},
    ]


def test_conversational_prompt_completion_and_a_named_messages_column(tmp_path):
    rows = [
        {
            "domain": "c",
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "completion": [{"role": "assistant", "content": "Paris"}],
        }
    ]
    assert load_records(str(write_jsonl(tmp_path / "a.jsonl", rows))) == [
        {"domain": "c", "messages": [{"role": "user", "content": "Capital of France?"}], "response": "Paris"}
    ]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "b.jsonl", [{"domain": "c", "dialog": conv}])
    assert load_records(str(path), messages_column="dialog") == [{"domain": "c", "messages": conv[:1], "response": "a"}]
    parquet = write_parquet(tmp_path / "c.parquet", [{"domain": "c", "messages": conv}])
    assert load_records(str(parquet)) == [{"domain": "c", "messages": conv[:1], "response": "a"}]


def test_malformed_conversations_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": "c", "messages": [{"speaker": "user", "text": "q"}]}])
    with pytest.raises(ValueError, match=r"row 0, column 'messages', must be a list of \{'role'"):
        load_records(str(path))
    two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(tmp_path / "e.jsonl", [{"domain": "c", "prompt": "q", "completion": two}])
    with pytest.raises(ValueError, match=r"must be one assistant turn, got 2"):
        load_records(str(path))
    with pytest.raises(ValueError, match=r"no conversation column 'chat'.*data\.messages_column"):
        load_records(str(path), messages_column="chat")


# ---- errors -------------------------------------------------------------------------------------


def test_missing_domain_column_lists_columns_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError) as err:
        load_records(str(path), text_column="body")
    msg = str(err.value)
    assert "no domain column 'domain'" in msg
    assert "['source', 'body', 'gold', 'part']" in msg
    assert "data.domain_column=<name>" in msg


def test_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no text column 'text'.*data\.text_column=<name>"):
        load_records(str(path), domain_column="source")


def test_missing_prompt_or_response_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no response column 'reply'.*data\.response_column=<name>"):
        load_records(str(path), domain_column="source", prompt_column="body", response_column="reply")
    with pytest.raises(ValueError, match=r"needs both data\.prompt_column and data\.response_column"):
        load_records(str(path), domain_column="source", prompt_column="body")


def test_missing_answer_and_split_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no answer column 'x'.*data\.answer_column"):
        load_records(str(path), **{**MAPPING, "answer_column": "x"})
    with pytest.raises(ValueError, match=r"no split column 'y'.*data\.split_column"):
        load_records(str(path), **MAPPING, split_column="y")


def test_unknown_split_value(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": "a", "text": "x", "split": "holdout"}])
    with pytest.raises(ValueError, match=r"unknown split 'holdout' in split column 'split'"):
        load_records(str(path))


def test_empty_domain_value(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": "a", "text": "x"}, {"domain": "", "text": "y"}])
    with pytest.raises(ValueError, match=r"1 of 2 rows have an empty value in the domain column 'domain'"):
        load_records(str(path))


def test_domain_with_only_empty_texts_is_an_empty_domain(tmp_path):
    rows = [{"domain": "a", "text": "x"}, {"domain": "b", "text": ""}, {"domain": "b", "text": None}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"domain 'b' is empty: all of its 2 rows have an empty text"):
            load_records(str(path))


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match=r"not an existing file, folder or glob.*data\.format=hf"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"holds no \.jsonl"):
        load_records(str(tmp_path))
    with pytest.raises(ValueError, match=r"matches no files"):
        load_records(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match=r"unknown data\.format='xml'"):
        load_records(str(tmp_path), format="xml")
    odd = tmp_path / "data.txt"
    odd.write_text("{}")
    with pytest.raises(ValueError, match=r"cannot tell the format.*data\.format"):
        load_records(str(odd))


def test_select_domains_filters_and_rejects_unknown():
    records = [dict(r) for r in EXPECTED]
    kept = select_domains(records, ["math", "code"])
    assert [r["text"] for r in kept] == ["def f(x): return x", "import os", "2 + 3 = 5", "4 + 4 = 8"]
    assert select_domains(records, None) == records
    with pytest.raises(ValueError) as err:
        select_domains(records, ["math", "chemistry"])
    assert "unknown domain(s) ['chemistry']" in str(err.value)
    assert "['code', 'math', 'prose']" in str(err.value)
    with pytest.raises(ValueError, match="empty list"):
        select_domains(records, [])
    with pytest.raises(ValueError, match="more than once"):
        select_domains(records, ["math", "math"])
    with pytest.raises(ValueError, match="list of names"):
        select_domains(records, "math")  # type: ignore[arg-type]


def test_domain_names_sorted():
    assert domain_names(EXPECTED) == ["code", "math", "prose"]


# ---- splitting ----------------------------------------------------------------------------------


def _corpus(sizes: dict[str, int]) -> list[dict]:
    return [{"domain": d, "text": f"{d}-{i}"} for d, n in sizes.items() for i in range(n)]


def test_split_sizes_disjoint_and_complete():
    records = _corpus({"a": 20, "b": 7, "c": 50})
    splits = split_records(records, val_per_domain=2, test_per_domain=3, seed=0)
    texts = {name: [r["text"] for r in recs] for name, recs in splits.items()}
    all_texts = texts["train"] + texts["validation"] + texts["test"]
    assert sorted(all_texts) == sorted(r["text"] for r in records)
    assert len(set(all_texts)) == len(records)
    for name, per in (("validation", 2), ("test", 3)):
        assert {d: sum(r["domain"] == d for r in splits[name]) for d in "abc"} == {"a": per, "b": per, "c": per}
    assert all(r["split"] == name for name, recs in splits.items() for r in recs)
    assert "split" not in records[0]  # inputs are not modified


def test_split_is_deterministic_seeded_and_independent_of_other_domains():
    base = _corpus({"a": 30, "b": 30})
    one = split_records(base, val_per_domain=4, test_per_domain=4, seed=1)
    again = split_records(base, val_per_domain=4, test_per_domain=4, seed=1)
    other_seed = split_records(base, val_per_domain=4, test_per_domain=4, seed=2)
    assert one == again
    assert [r["text"] for r in one["test"]] != [r["text"] for r in other_seed["test"]]
    bigger = split_records(_corpus({"z": 10}) + base, val_per_domain=4, test_per_domain=4, seed=1)
    for name in ("train", "validation", "test"):
        assert [r for r in bigger[name] if r["domain"] != "z"] == one[name]


def test_split_respects_given_split():
    records = [
        {"domain": "a", "text": "1", "split": "train"},
        {"domain": "a", "text": "2", "split": "test"},
        {"domain": "b", "text": "3", "split": "train"},
    ]
    splits = split_records(records, val_per_domain=0, test_per_domain=5, seed=0)
    assert [r["text"] for r in splits["train"]] == ["1", "3"]
    assert [r["text"] for r in splits["test"]] == ["2"]
    assert splits["validation"] == []
    resplit = split_records(records, val_per_domain=0, test_per_domain=0, seed=0, split_column_present=False)
    assert [r["text"] for r in resplit["train"]] == ["1", "2", "3"]


def test_absent_split_is_carved_from_train_per_domain():
    records = [{"domain": d, "text": f"{d}{i}", "split": "train"} for d in "ab" for i in range(6)]
    records += [{"domain": "a", "text": "t", "split": "test"}]
    splits = split_records(records, val_per_domain=2, test_per_domain=3, seed=0)
    assert [r["text"] for r in splits["test"]] == ["t"]  # the given test split is kept as it is
    assert Counter(r["domain"] for r in splits["validation"]) == {"a": 2, "b": 2}
    assert Counter(r["domain"] for r in splits["train"]) == {"a": 4, "b": 4}
    assert all(r["split"] == "validation" for r in splits["validation"])
    given = {r["text"] for r in records}
    assert {r["text"] for recs in splits.values() for r in recs} == given
    assert split_records(records, val_per_domain=2, test_per_domain=3, seed=0) == splits


def test_split_errors():
    with pytest.raises(
        ValueError, match=r"domain 'b' has 3 examples: too few for test_per_domain=2 \+ val_per_domain=1"
    ):
        split_records(_corpus({"a": 10, "b": 3}), val_per_domain=1, test_per_domain=2, seed=0)
    with pytest.raises(ValueError, match=r"val_per_domain must be a non-negative integer"):
        split_records(_corpus({"a": 10}), val_per_domain=-1, test_per_domain=0, seed=0)
    mixed = [{"domain": "a", "text": "1", "split": "train"}, {"domain": "a", "text": "2"}]
    with pytest.raises(ValueError, match=r"1 of 2 records have no split"):
        split_records(mixed, val_per_domain=0, test_per_domain=0, seed=0)
    no_train = [{"domain": "a", "text": "1", "split": "train"}, {"domain": "b", "text": "2", "split": "test"}]
    with pytest.raises(ValueError, match=r"domain\(s\) \['b'\] have no train examples"):
        split_records(no_train, val_per_domain=0, test_per_domain=0, seed=0)


def test_jsonl_integer_answers_with_nulls_stay_integers(tmp_path):
    rows = [{"domain": "m", "text": "a", "answer": 8}, {"domain": "m", "text": "b", "answer": None}]
    records = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert records == [{"domain": "m", "text": "a", "answer": "8"}, {"domain": "m", "text": "b"}]


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"domain": "a", "text": "x"}\n{"domain": "a", "text": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2 is not valid JSON"):
        load_records(str(path))


def test_columns_that_appear_only_late_in_the_file_are_seen(tmp_path):
    rows = [{"domain": "prose", "text": f"t{i}"} for i in range(1500)]
    rows.append({"domain": "math", "prompt": "1+1?", "response": "2"})
    records = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert records[-1] == {"domain": "math", "prompt": "1+1?", "response": "2"}


def test_a_line_separator_inside_a_jsonl_value_does_not_split_the_row(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [{"domain": "a", "text": "one\u2028two\u2029three\x85four"}, {"domain": "a", "text": "next"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    records = load_records(str(path), with_sources=True)
    assert [r["text"] for r in records] == [rows[0]["text"], "next"]
    assert [r["source"] for r in records] == ["mix.jsonl:1", "mix.jsonl:2"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_records_come_in_chunks_with_the_ids_and_order_of_load_records(tmp_path, fmt):
    from mixsel.data.loading import iter_records

    rows = [{"domain": "ab"[i % 2], "text": f"row {i}"} for i in range(25)]
    path = tmp_path / f"mix.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        pytest.importorskip("pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        pytest.importorskip("pandas")
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    chunks = list(iter_records(str(path), with_sources=True, chunk_size=10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [r for c in chunks for r in c] == load_records(str(path), with_sources=True)
