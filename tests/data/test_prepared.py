"""The prepared store: the same splits, tokens and counts as the record path; reuse; and its faults.

The record path (:func:`mixsel.data.build.tokenize_mixture` on :func:`load_mixture_records`) is the
oracle: it splits Python records with :func:`split_records` and tokenises them in memory, while the
store tokenises the whole source once with ``datasets.map`` and splits by index arithmetic.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import random
import warnings
from pathlib import Path

import pytest
import torch

import _mixture
from mixsel.config import DataConfig
from mixsel.errors import DataError

pytest.importorskip("datasets")
pytest.importorskip("transformers")

NAMES = ("train", "validation", "test")


def _tokenizer():
    from mixsel.data.embedded import load_embedded_tokenizer

    return load_embedded_tokenizer()


def _load(cfg: DataConfig, cache: Path, seed: int = 0):
    from mixsel.data import build

    build._MEMO.clear()
    return build.load_mixture(cfg, _tokenizer(), seed=seed, cache_dir=str(cache))


def _oracle(cfg: DataConfig, seed: int = 0):
    from mixsel.data.build import load_mixture_records, resolve_source, tokenize_mixture

    return tokenize_mixture(load_mixture_records(cfg, seed), _tokenizer(), cfg, source=resolve_source(cfg))


def _assert_same(store, oracle) -> None:
    assert store.domains == oracle.domains
    assert store.summary == oracle.summary
    for name in NAMES:
        a, b = getattr(store, name), getattr(oracle, name)
        assert len(a) == len(b), name
        assert torch.equal(a.domain_ids, b.domain_ids), name
        assert [t.tolist() for t in a.input_ids] == [t.tolist() for t in b.input_ids], name
        assert [t.tolist() for t in a.labels] == [t.tolist() for t in b.labels], name
        assert list(a.prompts) == list(b.prompts) and list(a.answers) == list(b.answers), name
        assert a.source_of(range(len(a))) == b.source_of(range(len(b))), name
        assert torch.equal(a.num_targets(), b.num_targets()), name
        if len(a):
            index = [*range(len(a) - 1, -1, -1), 0]  # reversed, with a repeat
            ca, cb = a.collate(index, 0, pad_to_multiple_of=8), b.collate(index, 0, pad_to_multiple_of=8)
            assert all(torch.equal(ca[k], cb[k]) for k in cb), name


def _random_rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        domain = rnd.choice(["alpha", "beta", "gamma"])
        if rnd.random() < 0.5:
            rows.append(
                {"domain": domain, "text": " ".join(f"w{rnd.randrange(50)}" for _ in range(rnd.randrange(1, 60)))}
            )
        else:
            rows.append(
                {
                    "domain": domain,
                    "prompt": " ".join(f"q{rnd.randrange(50)}" for _ in range(rnd.randrange(0, 50))),
                    "response": f"r{i} #### {i % 7}",
                }
            )
    rows[3]["text"] = "a\u2028b"  # a line separator inside a value: one JSONL row
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_train_per_domain": 5, "val_per_domain": 2, "test_per_domain": 3},
        {"domains": ["gamma", "alpha"], "truncation": "drop", "max_length": 24},
        {"truncation": "right", "max_length": 16, "val_per_domain": 0},
    ],
)
def test_random_splits_equal_the_record_path(tmp_path, options):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(300, 1))
    cfg = DataConfig(source=str(source), **{"max_length": 48, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (0, 3):
            _assert_same(_load(cfg, tmp_path / "cache", seed), _oracle(cfg, seed))


def test_split_column_data_equals_the_record_path(tmp_path):
    cfg = DataConfig(source=str(_mixture.write(tmp_path / "mix.jsonl")), max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(_load(cfg, tmp_path / "cache"), _oracle(cfg))


def test_the_embedded_corpus_equals_the_record_path(tmp_path):
    cfg = DataConfig(max_length=64, max_train_per_domain=300)
    _assert_same(_load(cfg, tmp_path / "cache"), _oracle(cfg))


def test_a_second_load_reuses_the_store_and_other_settings_share_it(tmp_path, monkeypatch):
    from mixsel.data import prepared

    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(200, 2))
    builds = []
    real = prepared._build
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: (builds.append(1), real(*a, **k))[1])
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    first = _load(cfg, tmp_path / "cache")
    again = _load(cfg, tmp_path / "cache", seed=5)  # another seed, split and cap: the same store
    capped = _load(
        DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48, max_train_per_domain=3),
        tmp_path / "cache",
    )
    assert len(builds) == 1
    assert first.corpus.path == again.corpus.path == capped.corpus.path
    _load(
        DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=40), tmp_path / "cache"
    )  # other tokens: another store
    assert len(builds) == 2 and len(list((tmp_path / "cache").glob("*/manifest.json"))) == 2


def test_a_changed_source_is_prepared_again(tmp_path):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(200, 3))
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    before = _load(cfg, tmp_path / "cache")
    rows = _random_rows(200, 3)
    rows[0] = {"domain": rows[0]["domain"], "text": "an edited first row"}
    _write_jsonl(source, rows)
    after = _load(cfg, tmp_path / "cache")
    assert after.corpus.path != before.corpus.path
    _assert_same(after, _oracle(cfg))


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "no_manifest"])
def test_a_damaged_store_is_prepared_again_with_one_warning(tmp_path, damage):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(200, 4))
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    first = _load(cfg, tmp_path / "cache")
    folder = first.corpus.path
    del first
    arrow = folder / "tokens.arrow"
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(arrow.read_bytes())
        data[-10] ^= 0xFF
        arrow.write_bytes(bytes(data))
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "manifest.json").unlink()  # as a preparation killed before its last write
    with pytest.warns(UserWarning, match="incomplete or damaged") as caught:
        again = _load(cfg, tmp_path / "cache")
    assert sum("incomplete or damaged" in str(w.message) for w in caught) == 1
    _assert_same(again, _oracle(cfg))


def test_a_planted_index_runs_no_code_and_is_prepared_again(tmp_path):
    import numpy as np

    from mixsel.data import prepared

    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(120, 5))
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    folder = _load(cfg, tmp_path / "cache").corpus.path
    np.savez(folder / "index.npz", domain=np.array([object()], dtype=object))  # needs pickle to load
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["name"] == "index.npz":  # a forger who also fixed the manifest
            entry["bytes"] = (folder / "index.npz").stat().st_size
            entry["sha256"] = prepared._hash_head_tail(folder / "index.npz")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="unreadable"):
        again = _load(cfg, tmp_path / "cache")
    _assert_same(again, _oracle(cfg))


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path):
    from mixsel.data import prepared

    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(100, 6))
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    key = prepared._key(prepared._key_inputs(cfg, _tokenizer()))
    stale = tmp_path / "cache" / f"{key}.tmp99999"
    (stale / "raw").mkdir(parents=True)
    (stale / "tokens.arrow").write_bytes(b"half")
    _load(cfg, tmp_path / "cache")
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [key]


def test_a_full_disk_fails_with_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from mixsel.data import prepared

    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(100, 7))
    real = prepared._index_arrays

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepared, "_index_arrays", full)
    with pytest.raises(DataError, match="no space left on the device") as err:
        _load(DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48), tmp_path / "cache")
    assert "\n" not in str(err.value) and "data.cache_dir" in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_cache_off_prepares_into_a_temporary_folder(tmp_path):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(100, 8))
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48, cache=False)
    mixture = _load(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert "mixsel-prepared-" in str(mixture.corpus.path)


def test_normalisation_warnings_are_given_again_when_the_store_is_reused(tmp_path):
    rows = _random_rows(100, 9)
    rows.append({"domain": "alpha", "text": "   "})  # dropped: empty text
    source = _write_jsonl(tmp_path / "mix.jsonl", rows)
    cfg = DataConfig(source=str(source), val_per_domain=4, test_per_domain=4, max_length=48)
    for _ in range(2):
        with pytest.warns(UserWarning, match="dropped 1 rows with an empty text"):
            _load(cfg, tmp_path / "cache")


def _prepare_in_child(source: str, cache: str, queue) -> None:
    from mixsel.data.build import load_mixture

    mixture = load_mixture(
        DataConfig(source=source, val_per_domain=4, test_per_domain=4, max_length=48), _tokenizer(), cache_dir=cache
    )
    queue.put((str(mixture.corpus.path), [t.tolist() for t in mixture.train.input_ids][:50]))


def test_two_processes_preparing_at_once_share_one_store(tmp_path):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(400, 10))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_prepare_in_child, args=(str(source), str(tmp_path / "cache"), queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_unknown_domains_and_too_small_domains_fail_as_on_the_record_path(tmp_path):
    source = _write_jsonl(tmp_path / "mix.jsonl", _random_rows(60, 11))
    with pytest.raises(DataError, match="unknown domain"):
        _load(DataConfig(source=str(source), domains=["alpha", "delta"]), tmp_path / "cache")
    with pytest.raises(DataError, match="too few for test_per_domain"):
        _load(DataConfig(source=str(source), val_per_domain=30, test_per_domain=30), tmp_path / "cache")


def test_a_store_column_reads_rows_across_arrow_chunks_without_concatenating_them():
    import numpy as np
    import pyarrow as pa

    from mixsel.data.tokenize import StoreColumn

    chunks = [pa.array([[c * 10 + j, c] for j in range(10)], type=pa.list_(pa.int32())) for c in range(7)]
    table = pa.table({"input_ids": pa.chunked_array(chunks)})
    rows = np.random.default_rng(0).permutation(70)
    column = StoreColumn(table, "input_ids", rows, tensors=True)
    positions = [69, 0, 5, 5, 33, 12]  # out of order, with a repeat, across chunks
    assert [t.tolist() for t in column.take(positions)] == [[int(rows[p]), int(rows[p]) // 10] for p in positions]
    assert [t.tolist() for t in column] == [[int(r), int(r) // 10] for r in rows]
    assert column[-1].tolist() == [int(rows[-1]), int(rows[-1]) // 10]
