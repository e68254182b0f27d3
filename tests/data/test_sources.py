"""Source ids: every tokenised row names the file and line (or row, or hub split and index) it came from."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest
import torch

import _mixture
from mixsel.config import DataConfig
from mixsel.data.loading import load_records, normalize_records
from mixsel.data.tokenize import TokenizedSplit, tokenize_records

SPLIT_NAMES = ("train", "validation", "test")


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _fixture_lines() -> list[str]:
    """The mixed fixture as JSONL with a blank line and a row that loading drops (empty text)."""
    lines = [json.dumps(row) for row in _mixture.rows()]
    lines.insert(3, "")
    lines.insert(7, json.dumps({"domain": "dictionary", "split": "train", "text": "  "}))
    return lines


def _line(folder: Path, source_id: str) -> dict:
    name, line_no = source_id.rsplit(":", 1)
    return json.loads((folder / name).read_text(encoding="utf-8").splitlines()[int(line_no) - 1])


def test_jsonl_rows_map_back_to_their_lines_despite_drops(tmp_path):
    from mixsel.data import build
    from mixsel.data.embedded import load_embedded_tokenizer

    folder = tmp_path / "data"
    _write_lines(folder / "sub" / "mix.jsonl", _fixture_lines())
    _write_lines(folder / "extra.jsonl", [json.dumps({"domain": "chat", "split": "train", "messages": []})])
    cfg = DataConfig(
        source=str(folder), max_length=64, truncation="drop", domains=["dictionary", "algebra", "chat"]
    )  # "trl" filtered out, long prompt/response rows dropped, long texts cut
    tok = load_embedded_tokenizer()
    build._MEMO.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixture = build.load_mixture(cfg, tok)
    build._MEMO.clear()
    assert sum(c.dropped for split in SPLIT_NAMES for c in getattr(mixture, split).counts.values()) > 0

    kept = set()
    for name in SPLIT_NAMES:
        split = getattr(mixture, name)
        ids = split.source_of(range(len(split)))
        assert ids == split.sources and len(ids) == len(split)
        for i, source_id in enumerate(ids):
            assert source_id.startswith("sub/mix.jsonl:"), source_id
            row = _line(folder, source_id)
            assert row["split"] == name and row["domain"] == split.domains[int(split.domain_ids[i])]
            (rec,) = normalize_records([row])
            again = tokenize_records([rec], tok, domains=split.domains, max_length=64, truncation="drop")
            assert torch.equal(again.input_ids[0], split.input_ids[i]), source_id
            kept.add(int(source_id.rsplit(":", 1)[1]))
    lines = _fixture_lines()
    assert 4 not in kept and 8 not in kept  # the blank line, the row with an empty text
    assert all(json.loads(lines[n - 1])["domain"] != "trl" for n in kept)
    assert len(kept) == sum(len(getattr(mixture, s)) for s in SPLIT_NAMES)  # unique


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_table_files_give_zero_based_row_indices(tmp_path, suffix):
    rows = [
        {"domain": "a", "text": "first"},
        {"domain": "a", "text": ""},  # dropped: the others keep their row index
        {"domain": "b", "text": "third"},
        {"domain": "a", "text": "fourth"},
    ]
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        records = load_records(str(path), with_sources=True)
    assert [(r["text"], r["source"]) for r in records] == [
        ("first", f"d{suffix}:0"),
        ("third", f"d{suffix}:2"),
        ("fourth", f"d{suffix}:3"),
    ]


def test_ids_name_files_relative_to_a_folder_or_glob_and_gzip_lines(tmp_path):
    row = json.dumps({"domain": "a", "text": "x"})
    _write_lines(tmp_path / "top" / "one.jsonl", [row, row])
    (tmp_path / "top" / "deep").mkdir()
    with gzip.open(tmp_path / "top" / "deep" / "two.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n" + row + "\n")  # a blank first line: the row is line 2
    expected = ["deep/two.jsonl.gz:2", "one.jsonl:1", "one.jsonl:2"]
    assert [r["source"] for r in load_records(str(tmp_path / "top"), with_sources=True)] == expected
    assert [r["source"] for r in load_records(str(tmp_path / "top" / "**" / "*.jsonl*"), with_sources=True)] == expected
    assert [r["source"] for r in load_records(str(tmp_path / "top" / "one.jsonl"), with_sources=True)] == expected[1:]
    assert all("source" not in r for r in load_records(str(tmp_path / "top")))  # only when asked for


def test_hf_saved_folders_and_hub_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"domain": "a", "text": t} for t in ("x", "", "z")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "dict"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = load_records(str(tmp_path / "flat"), with_sources=True)
        both = load_records(str(tmp_path / "dict"), with_sources=True)
        test = load_records(str(tmp_path / "dict"), hf_split="test", with_sources=True)
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd if k["split"] is None else dd[k["split"]])
        hub = load_records("someone/mix", format="hf", hf_config="main", hf_split="test", with_sources=True)
        hub_all = load_records("someone/mix", format="hf", with_sources=True)
    assert [r["source"] for r in flat] == ["flat:0", "flat:2"]
    assert [r["source"] for r in both] == ["dict:train:0", "dict:train:2", "dict:test:0", "dict:test:2"]
    assert [r["source"] for r in test] == ["dict:test:0", "dict:test:2"]
    assert [r["source"] for r in hub] == ["someone/mix/main:test:0", "someone/mix/main:test:2"]
    assert [r["source"] for r in hub_all] == [f"someone/mix:{s}:{i}" for s in ("train", "test") for i in (0, 2)]


def test_embedded_rows_have_unique_ids_naming_their_line():
    from mixsel.data.build import load_mixture_records, tokenize_mixture
    from mixsel.data.embedded import EMBEDDED_DIR, load_embedded_records, load_embedded_tokenizer

    records = load_embedded_records(with_sources=True)
    ids = [r["source"] for r in records]
    assert all(ids) and len(set(ids)) == len(ids)
    with gzip.open(EMBEDDED_DIR / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    for rec in records[::997]:
        name, line_no = rec["source"].rsplit(":", 1)
        assert name == "corpus.jsonl.gz"
        assert {**json.loads(lines[int(line_no) - 1]), "source": rec["source"]} == rec
    assert "source" not in load_embedded_records("test")[0]

    splits = load_mixture_records(DataConfig())
    assert all(r["source"] for recs in splits.values() for r in recs)
    small = {name: recs[:: 50 if name == "train" else 5] for name, recs in splits.items()}
    mixture = tokenize_mixture(small, load_embedded_tokenizer(), DataConfig())
    for name in SPLIT_NAMES:
        assert getattr(mixture, name).sources == [r["source"] for r in small[name]]


def test_source_of_on_hand_built_splits_and_bad_indices():
    split = TokenizedSplit(
        domains=["x"],
        domain_ids=torch.tensor([0, 0]),
        input_ids=[torch.tensor([1, 2])] * 2,
        labels=[torch.tensor([1, 2])] * 2,
    )
    assert split.source_of(torch.tensor([1, 0, 1])) == ["", "", ""]
    named = TokenizedSplit(
        domains=["x"],
        domain_ids=torch.tensor([0, 0]),
        input_ids=[torch.tensor([1, 2])] * 2,
        labels=[torch.tensor([1, 2])] * 2,
        sources=["f.jsonl:1", "f.jsonl:3"],
    )
    assert named.source_of([1, 1]) == ["f.jsonl:3", "f.jsonl:3"]
    with pytest.raises(ValueError, match=r"source_of indices must lie in \[0, 2\)"):
        named.source_of([2])
    with pytest.raises(ValueError, match="sources"):
        TokenizedSplit(
            domains=["x"],
            domain_ids=[0],
            input_ids=[torch.tensor([1, 2])],
            labels=[torch.tensor([1, 2])],
            sources=["a", "b"],
        )


def test_rows_given_in_memory_are_numbered():
    pytest.importorskip("datasets")
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.data.sft import sft_datasets

    rows = [{"domain": "a", "text": f"row {i}", "split": "test" if i == 2 else "train"} for i in range(4)]
    data = sft_datasets(load_embedded_tokenizer(), DataConfig(max_length=16, val_per_domain=0), rows=rows)
    assert data.mixture.train.sources == ["rows:0", "rows:1", "rows:3"]
    assert data.mixture.test.sources == ["rows:2"]
