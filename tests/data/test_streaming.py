"""Streaming data (data.streaming=true): held-out rows, pools by weight, bounded buffers, exact resume."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from mixsel.config import DataConfig, load_config, validate
from mixsel.data.sampler import CandidateSampler
from mixsel.data.streaming import StreamingSampler, held_out_records, load_streaming
from mixsel.errors import ConfigError, DataError

from _fast import FAST

pytest.importorskip("transformers")

DOMAINS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def tokenizer():
    from mixsel.data.embedded import load_embedded_tokenizer

    return load_embedded_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=90):
    """Interleaved rows of three domains (beta twice as often as gamma), each text naming its line."""
    order = ["alpha", "beta", "beta", "gamma", "alpha", "beta"]
    return [{"domain": order[i % 6], "text": f"line {i + 1} " + "tok " * (i % 5)} for i in range(n)]


def _cfg(path, **kw):
    base = {
        "source": str(path),
        "domains": list(DOMAINS),
        "streaming": True,
        "val_per_domain": 2,
        "test_per_domain": 1,
        "stream_buffer": 4,
        "max_length": 24,
    }
    return DataConfig(**{**base, **kw})


def _sampler(cfg, tokenizer, pool_size=6, seed=0, **kw):
    return StreamingSampler.from_config(cfg, tokenizer, pool_size=pool_size, seed=seed, **kw)


def _domains(sampler, ids):
    return sampler.collate(ids, 0)["domain_ids"].tolist()


def test_held_out_rows_are_the_first_of_each_domain_and_never_drawn(tmp_path, tokenizer):
    rows = _rows()
    cfg = _cfg(_write(tmp_path / "d.jsonl", rows))
    mixture, sampler = load_streaming(cfg, tokenizer, pool_size=6, seed=0)
    lines = {d: [i + 1 for i, r in enumerate(rows) if r["domain"] == d] for d in DOMAINS}
    want_val = sorted(f"d.jsonl:{n}" for d in DOMAINS for n in lines[d][:2])
    want_test = sorted(f"d.jsonl:{n}" for d in DOMAINS for n in lines[d][2:3])
    assert sorted(mixture.validation.sources) == want_val
    assert sorted(mixture.test.sources) == want_test
    assert len(mixture.train) == 0 and mixture.summary.streaming
    held = set(want_val) | set(want_test)
    drawn = set()
    for _ in range(30):  # several passes over the 81 training rows
        drawn.update(sampler.source_of(sampler.draw(torch.tensor([1.0, 1.0, 1.0]))))
    assert sampler.passes >= 1
    assert not drawn & held
    assert drawn <= {f"d.jsonl:{i + 1}" for i in range(len(rows))} - held
    # buffers larger than the domains: nothing is skipped, and a pass draws each training row once
    _, roomy = load_streaming(_cfg(tmp_path / "d.jsonl", stream_buffer=100), tokenizer, pool_size=6, seed=0)
    first_pass = []
    while roomy.passes == 0:
        ids = roomy.draw(torch.tensor([1.0, 1.0, 1.0]))
        first_pass += roomy.source_of(ids) if roomy.passes == 0 else []
    assert sum(roomy.skipped) == 0 and len(first_pass) == len(set(first_pass)) >= 30
    # the data summary says the training rows are streamed
    from mixsel.data.summary import format_data_summary

    text = format_data_summary(mixture.summary)
    assert "stream" in text.splitlines()[3] and "read as a stream" in text


def test_held_out_records_need_enough_rows_per_domain(tmp_path):
    cfg = _cfg(_write(tmp_path / "d.jsonl", _rows(12)), val_per_domain=2, test_per_domain=2)
    with pytest.raises(DataError, match="too few rows of domain"):
        held_out_records(cfg)  # gamma has 2 rows
    cfg = _cfg(tmp_path / "d.jsonl", domains=["alpha", "delta"])
    with pytest.raises(DataError, match="delta"):
        held_out_records(cfg)


def test_pools_follow_the_weights_as_candidate_sampler_allocates(tmp_path, tokenizer):
    cfg = _cfg(_write(tmp_path / "d.jsonl", _rows()))
    for allocation in ("multinomial", "proportional"):
        sampler = _sampler(cfg, tokenizer, pool_size=7, allocation=allocation)
        reference = CandidateSampler(torch.tensor([0, 1, 2]), 7, seed=0, allocation=allocation)
        for step in range(12):
            w = torch.tensor([0.7, 0.3, 0.0]) if step % 2 else torch.tensor([0.2, 0.5, 0.3])
            reference._gen.set_state(sampler._gen.get_state())  # the same randomness for the allocation
            want = reference.allocate(w).tolist()
            counts = torch.bincount(torch.tensor(_domains(sampler, sampler.draw(w))), minlength=3).tolist()
            assert counts == want
            if step % 2:
                assert counts[2] == 0  # weight 0: never drawn


def test_natural_weights_follow_the_rows_read(tmp_path, tokenizer):
    sampler = _sampler(_cfg(_write(tmp_path / "d.jsonl", _rows())), tokenizer, pool_size=12)
    seen = []
    for _ in range(10):
        seen += _domains(sampler, sampler.draw())
    counts = torch.bincount(torch.tensor(seen), minlength=3).tolist()
    assert counts[1] > counts[0] > counts[2] > 0  # the stream's shares 2 : 3 : 1


def test_buffers_stay_bounded_and_full_buffers_skip_with_a_count(tmp_path, tokenizer, caplog):
    cfg = _cfg(_write(tmp_path / "d.jsonl", _rows()), stream_buffer=3)
    sampler = _sampler(cfg, tokenizer, pool_size=5)
    with caplog.at_level(logging.WARNING, logger="mixsel.data.streaming"):
        for _ in range(20):
            ids = sampler.draw(torch.tensor([0.0, 0.1, 0.9]))  # gamma is rare in the stream
            assert max(sampler.buffered) <= 3
            for d in range(3):
                assert len(set(sampler.buffer_positions(d))) == len(sampler.buffer_positions(d))
            assert len(ids) == 5
    assert sampler.skipped[1] > 0  # beta's full buffer skipped rows while gamma refilled
    assert "is full (data.stream_buffer=3)" in caplog.text
    assert "pass 1 of the stream ended" in caplog.text


def test_rows_dropped_by_tokenisation_are_counted_and_never_drawn(tmp_path, tokenizer):
    rows = []
    for i in range(60):
        response = "long " * 40 if i % 4 == 0 else "ok"
        rows.append({"domain": DOMAINS[i % 3], "prompt": f"q{i + 1}", "response": response})
    cfg = _cfg(_write(tmp_path / "d.jsonl", rows), truncation="drop", val_per_domain=1, test_per_domain=0)
    sampler = _sampler(cfg, tokenizer, pool_size=6)
    drawn = set()
    for _ in range(15):
        drawn.update(sampler.source_of(sampler.draw(torch.tensor([1.0, 1.0, 1.0]))))
    long_lines = {f"d.jsonl:{i + 1}" for i in range(60) if i % 4 == 0}
    assert sum(sampler.dropped) > 0
    assert not drawn & long_lines


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what checkpoints read


@pytest.mark.parametrize("natural", [False, True])
def test_resume_draws_the_same_pools_across_a_pass_boundary(tmp_path, tokenizer, natural):
    cfg = _cfg(_write(tmp_path / "d.jsonl", _rows()), stream_buffer=5)

    def weights(step):
        return None if natural else torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.7, 0.0]][step % 3])

    straight = _sampler(cfg, tokenizer, pool_size=8, seed=3)
    for step in range(6):
        straight.draw(weights(step))
    state = _roundtrip(straight.state_dict())
    resumed = _sampler(cfg, tokenizer, pool_size=8, seed=3)
    resumed.load_state_dict(state)
    assert resumed.buffered == straight.buffered
    passes = straight.passes
    for step in range(6, 20):
        a, b = straight.draw(weights(step)), resumed.draw(weights(step))
        assert torch.equal(a, b), step
        assert straight.source_of(a) == resumed.source_of(b)
        ca, cb = straight.collate(a, 0), resumed.collate(b, 0)
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert straight.passes > passes  # the compared draws crossed into a new pass
    assert resumed.state_dict()["checksum"] == straight.state_dict()["checksum"]


def test_resume_refuses_other_settings_or_changed_data(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", _rows())
    sampler = _sampler(_cfg(path), tokenizer)
    for _ in range(3):
        sampler.draw(torch.tensor([1.0, 1.0, 1.0]))
    state = sampler.state_dict()
    with pytest.raises(DataError, match="buffer_size"):
        _sampler(_cfg(path, stream_buffer=8), tokenizer).load_state_dict(state)
    with pytest.raises(DataError, match="not a streaming sampler"):
        other = CandidateSampler(torch.tensor([0, 1, 2]), 2, seed=0).state_dict()
        _sampler(_cfg(path), tokenizer).load_state_dict(other)
    _write(path, [{**r, "text": r["text"] + " edited"} for r in _rows()])
    with pytest.raises(DataError, match="changed since the checkpoint"):
        _sampler(_cfg(path), tokenizer).load_state_dict(state)


def test_a_weighted_domain_without_training_rows_stops_with_one_line(tmp_path, tokenizer):
    rows = [r for r in _rows() if r["domain"] != "gamma"] + [{"domain": "gamma", "text": "only"}] * 3
    sampler = _sampler(_cfg(_write(tmp_path / "d.jsonl", rows)), tokenizer)
    sampler.draw(torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(DataError, match="'gamma' .* all held out"):
        sampler.draw(torch.tensor([0.0, 0.0, 1.0]))


def test_hub_format_streams_through_datasets(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    rows = _rows(40)
    cfg = _cfg(_write(tmp_path / "d.jsonl", rows), format="hf")
    mixture, sampler = load_streaming(cfg, tokenizer, pool_size=4, seed=0)
    assert mixture.validation.sources[:2] == ["d.jsonl:train:0", "d.jsonl:train:1"]  # alpha's first, then beta's
    sources = sampler.source_of(sampler.draw(torch.tensor([1.0, 1.0, 1.0])))
    assert all(s.startswith("d.jsonl:train:") for s in sources)


def test_refused_combinations_name_the_fix(tmp_path):
    from mixsel.data.build import load_mixture
    from mixsel.preflight import check_methods

    with pytest.raises(ConfigError, match=r"data\.domains=\[\.\.\.\]"):
        validate(load_config(None, ["data.streaming=true"]))
    with pytest.raises(ConfigError, match="unset data.split_column"):
        validate(load_config(None, ["data.streaming=true", "data.domains=[a]", "data.split_column=split"]))
    with pytest.raises(ConfigError, match="stream_buffer"):
        validate(load_config(None, ["data.streaming=true", "data.domains=[a]", "data.stream_buffer=0"]))
    colm = load_config(None, ["data.streaming=true", "data.domains=[a]", "selection.method=colm"])
    with pytest.raises(ConfigError, match="small_from=pool"):
        check_methods(colm)
    ok = load_config(None, ["data.streaming=true", "data.domains=[a]", "selection.method=colm"])
    ok.selection.options = {"small_from": "pool"}
    check_methods(ok)
    with pytest.raises(DataError, match="data.streaming=false"):
        load_mixture(_cfg(tmp_path / "none.jsonl"), tokenizer=None)


def test_train_through_the_cli_resumes_exactly(tmp_path):
    from mixsel.cli import main

    path = _write(tmp_path / "d.jsonl", _rows())
    args = [
        *FAST,
        f"data.source={path}",
        "data.streaming=true",
        "data.domains=[alpha,beta,gamma]",
        "data.stream_buffer=6",
        "data.max_train_per_domain=12",  # a short pass: the run crosses into the next one
        "data.val_per_domain=4",
        "data.test_per_domain=2",
        "eval.exact_match=0",
        "train.log_selections=true",
        "train.max_steps=6",
    ]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", *args, f"train.output_dir={straight}", "-q"]) == 0
    assert main(["train", *args, f"train.output_dir={cut}", "train.stop_after=3", "-q"]) == 0
    assert (cut / "checkpoint").exists() and not (cut / "result.json").exists()
    assert main(["train", *args, f"train.output_dir={cut}", "--resume", "-q"]) == 0
    a, b = (json.loads((run / "result.json").read_text()) for run in (straight, cut))
    losses = [k for k in a if "/loss" in k]
    assert losses and all(a[k] == b[k] for k in losses)
    assert a["final_weights"] == b["final_weights"]
    assert (cut / "selections.jsonl").read_text() == (straight / "selections.jsonl").read_text()
    steps = [json.loads(line) for line in (straight / "selections.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(s["sources"] for s in steps)
    # training rows only: the held-out rows (first 4 + 2 of each domain) are never selected
    held = set(load_streaming_held(path))
    assert not held & {src for s in steps for src in s["sources"]}


def load_streaming_held(path):
    validation, test = held_out_records(
        DataConfig(source=str(path), domains=list(DOMAINS), streaming=True, val_per_domain=4, test_per_domain=2)
    )
    return [r["source"] for r in validation + test]
