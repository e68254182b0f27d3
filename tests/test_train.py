"""End-to-end runs of the training loop on the embedded corpus with a micro Llama (seconds each)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mixsel.config import load_config

from _fast import FAST

pytest.importorskip("transformers")


def _cfg(tmp_path, *extra):
    return load_config(None, [*FAST, f"train.output_dir={tmp_path}", *extra])


def _final_params(run_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_short_run_writes_outputs_and_learns(tmp_path):
    from mixsel.train import train

    result = train(_cfg(tmp_path, "train.max_steps=6", "selection.method=stratified"), progress=False)
    for name in ("config.yaml", "metrics.jsonl", "result.json"):
        assert (tmp_path / name).exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    # per-domain validation losses and exact match on the arithmetic domain are reported
    assert any(k.startswith("test/loss/") for k in result)
    assert any(k.startswith("test/exact_match/") for k in result)
    assert result["test/loss_worst"] >= result["test/loss_mean"]
    # stratified selection follows the pool's domain proportions; fractions sum to 1
    fracs = [v for k, v in rows[0].items() if k.startswith("select/frac/")]
    assert abs(sum(fracs) - 1) < 1e-9
    # loss went down from a fresh init (ln V ~ 8.3 for the embedded tokenizer)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_resume_is_exact(tmp_path):
    from mixsel.train import train

    straight = tmp_path / "straight"
    train(_cfg(straight, "train.max_steps=6"), progress=False)
    interrupted = tmp_path / "interrupted"
    out = train(_cfg(interrupted, "train.max_steps=6", "train.stop_after=3"), progress=False)
    assert out == {"stopped_at": 3}
    assert (interrupted / "checkpoint" / "state.pt").exists()
    train(_cfg(interrupted, "train.max_steps=6", "train.resume=true"), progress=False)
    a, b = _final_params(straight), _final_params(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # no duplicated steps after resume


def test_bad_config_errors(tmp_path):
    from mixsel.train import train

    with pytest.raises(ValueError, match="pool_size"):
        train(_cfg(tmp_path, "train.batch_size=16", "train.pool_size=8"), progress=False)
    with pytest.raises(KeyError, match="valid names"):
        train(_cfg(tmp_path, "selection.method=bogus"), progress=False)


def test_nan_loss_is_reported(tmp_path, monkeypatch):
    import mixsel.features.loss as loss_mod
    from mixsel.train import train

    real = loss_mod.token_losses

    def poisoned(logits, labels):
        return real(logits, labels) * float("nan")

    monkeypatch.setattr(loss_mod, "token_losses", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(_cfg(tmp_path, "train.max_steps=2"), progress=False)


def test_user_jsonl_data_with_lora(tmp_path):
    from mixsel.train import train

    rows = []
    for i in range(40):
        rows.append({"src": "alpha", "instruction": f"Add {i} and 2.", "output": f"{i + 2}"})
    for i in range(12):
        rows.append({"src": "beta", "instruction": f"Say word {i}", "output": "word " * (i % 5 + 1)})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(
        _cfg(
            tmp_path / "run",
            f"data.source={path}",
            "data.domain_column=src",
            "data.prompt_column=instruction",
            "data.response_column=output",
            "data.val_per_domain=3",
            "data.test_per_domain=3",
            "model.lora.enabled=true",
            "train.max_steps=2",
            "eval.exact_match=0",
            "train.log_selections=true",
        ),
        progress=False,
    )
    assert result["domains"] == ["alpha", "beta"]
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    # selections.jsonl says where every pick came from: its file and line, and its domain
    picks = [json.loads(line) for line in (tmp_path / "run" / "selections.jsonl").read_text().splitlines()]
    assert [p["step"] for p in picks] == [1, 2]
    for pick in picks:
        assert len(pick["sources"]) == len(pick["examples"]) == len(pick["domains"]) == 4
        for source, domain in zip(pick["sources"], pick["domains"]):
            name, line = source.split(":")
            assert name == "data.jsonl" and rows[int(line) - 1]["src"] == domain


@pytest.mark.parametrize(
    "method",
    [
        "random",
        "stratified",
        "partitionsel",
        "colm",
        "greats",
        "gradmatch",
        "craig",
        "per_domain",
        "grad_norm",
        "big_loss",
        "middle_ppl",
        "completion_length",
        "least_confidence",
        "hidden_fl",
    ],
)
def test_every_selector_trains(tmp_path, method):
    from mixsel.train import train

    result = train(
        _cfg(tmp_path, "train.max_steps=2", f"selection.method={method}", "eval.exact_match=0"), progress=False
    )
    assert torch.isfinite(torch.tensor(result["val/loss_mean"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    if method in ("partitionsel", "greats", "gradmatch", "craig", "per_domain"):
        # a Gram matrix was computed, so the conflict diagnostics are logged and bounded by k(k-1)/2
        assert all(0 <= r["select/conflicts"] <= 4 * 3 / 2 for r in rows)


@pytest.mark.parametrize("method", ["dograph", "static"])
def test_reweighters_compose_with_selection(tmp_path, method):
    from mixsel.train import train

    options = "reweighting.options={domain_sizes: [1, 1, 1, 1, 1, 1, 1], alpha: 1.0}" if method == "static" else ""
    extra = [o for o in [options] if o]
    result = train(
        _cfg(
            tmp_path,
            "train.max_steps=4",
            "selection.method=partitionsel",
            "selection.options={budget: weights}",
            f"reweighting.method={method}",
            "reweighting.projection_dim=64",
            *extra,
        ),
        progress=False,
    )
    weights = torch.tensor(result["final_weights"], dtype=torch.float64)
    assert abs(float(weights.sum()) - 1) < 1e-9 and bool((weights > 0).all())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(sum(v for k, v in r.items() if k.startswith("weights/")) - 1) < 1e-6 for r in rows)
    if method == "dograph":
        # the weights moved away from uniform after the gradient-driven updates
        assert float((weights - 1 / 7).abs().max()) > 1e-6
        # the domain-gradient pass is timed apart from the train step, and inside the step time
        assert all(0 < r["time/reweight"] < r["time/step"] for r in rows)


def test_two_stage_doremi_weights_from_a_proxy_run(tmp_path):
    """Stage one writes average_weights; stage two samples with them through static weights_from."""
    from mixsel.train import train

    proxy_dir, ref_dir, main_dir = tmp_path / "proxy", tmp_path / "ref", tmp_path / "main"
    train(_cfg(ref_dir, "train.max_steps=2", "eval.exact_match=0"), progress=False)
    proxy = train(
        _cfg(
            proxy_dir,
            "train.max_steps=3",
            "eval.exact_match=0",
            "reweighting.method=doremi",
            f"reweighting.reference_model={ref_dir / 'final'}",
        ),
        progress=False,
    )
    avg = torch.tensor(proxy["average_weights"], dtype=torch.float64)
    assert abs(float(avg.sum()) - 1) < 1e-9
    assert float((avg - 1 / 7).abs().max()) > 1e-6  # the proxy moved the weights
    main = train(
        _cfg(
            main_dir,
            "train.max_steps=1",
            "eval.exact_match=0",
            "reweighting.method=static",
            f"reweighting.options={{weights_from: {proxy_dir}}}",
        ),
        progress=False,
    )
    assert torch.allclose(torch.tensor(main["final_weights"], dtype=torch.float64), avg, atol=1e-6)

    with pytest.raises(FileNotFoundError, match="weights_from"):
        train(
            _cfg(
                tmp_path / "bad", "reweighting.method=static", f"reweighting.options={{weights_from: {tmp_path}/nope}}"
            ),
            progress=False,
        )


def test_one_weights_switch_warns_when_the_choice_departs_from_the_method(tmp_path, caplog):
    from mixsel.train import train

    with caplog.at_level("WARNING"):  # CRAIG trains on its cluster sizes by default: nothing to say
        train(_cfg(tmp_path / "a", "train.max_steps=1", "eval.exact_match=0", "selection.method=craig"), progress=False)
    assert not any("use_weights" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        train(
            _cfg(
                tmp_path / "b",
                "train.max_steps=1",
                "eval.exact_match=0",
                "selection.method=craig",
                "selection.use_weights=false",
            ),
            progress=False,
        )
    assert any("'craig' trains on its selection weights" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("sampling", "n"), [("uniform", None), ("balanced", 7), ("balanced", 10)])
def test_validation_anchors_of_a_training_step(tmp_path, monkeypatch, sampling, n):
    """The anchors a mixsel train step hands to the selector: their number and their domains."""
    from mixsel import bookkeeping
    from mixsel.step import OnlineSelector
    from mixsel.train import train

    seen = []
    real_call = OnlineSelector.__call__

    def call(self, model, batch, k, **kw):
        seen.append((kw["val_batch"]["index"].clone(), kw["val_batch"]["domain_ids"].clone()))
        return real_call(self, model, batch, k, **kw)

    monkeypatch.setattr(OnlineSelector, "__call__", call)
    extra = [f"selection.features.anchor_sampling={sampling}"] + ([f"selection.features.val_anchors={n}"] if n else [])
    train(
        _cfg(tmp_path, "train.max_steps=3", "eval.exact_match=0", "selection.method=partitionsel", *extra),
        progress=False,
    )
    assert len(seen) == 3
    if sampling == "uniform":  # the reference code's 4 anchors per step, uniform over the validation rows
        from mixsel.data.build import load_mixture
        from mixsel.model import build_tokenizer

        cfg = _cfg(tmp_path)
        val_ids = load_mixture(cfg.data, build_tokenizer(cfg.model), seed=0).validation.domain_ids
        for step, (_, domains) in enumerate(seen):
            want = bookkeeping.draw_anchors(len(val_ids), 4, seed=0, step=step)
            assert domains.tolist() == val_ids[want].tolist()
    else:  # round-robin: every domain once per 7 anchors, then the next ones in the step's order
        for rows, domains in seen:
            assert len(rows.unique()) == n
            counts = torch.bincount(domains, minlength=7)
            assert len(domains) == n and int(counts.min()) == n // 7 and int(counts.max()) == -(-n // 7)


def test_selections_log_starts_fresh_and_resumes_without_duplicates(tmp_path):
    from mixsel.train import train

    args = ["eval.exact_match=0", "train.log_selections=true", "selection.method=stratified"]
    train(_cfg(tmp_path, "train.max_steps=3", *args), progress=False)
    # a fresh run replacing the one in the same folder
    train(_cfg(tmp_path, "train.max_steps=3", "train.overwrite=true", *args), progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    straight = tmp_path / "straight"
    train(_cfg(straight, "train.max_steps=4", *args), progress=False)
    cut = tmp_path / "cut"
    train(_cfg(cut, "train.max_steps=4", "train.stop_after=2", *args), progress=False)
    train(_cfg(cut, "train.max_steps=4", "train.resume=true", *args), progress=False)
    assert (cut / "selections.jsonl").read_text() == (straight / "selections.jsonl").read_text()


def test_default_threads_share_the_physical_cores(monkeypatch):
    from mixsel.train import default_threads

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = default_threads()
    assert 1 <= alone <= (os.cpu_count() or 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")  # many processes on the machine: one thread each
    assert default_threads() == 1


def test_data_summary_names_domains_and_rows_per_split(tmp_path, caplog):
    """The start-of-run summary is the data layer's table; a domain without validation rows is warned about."""
    import json

    from mixsel.config import DataConfig, EvalConfig
    from mixsel.data.build import load_mixture
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.train import summarize_mixture

    rows = [
        {"domain": "a", "text": f"row {i} of a", "split": s}
        for i, s in enumerate(["train", "train", "validation", "test"])
    ]
    rows += [{"domain": "b", "text": f"row {i} of b", "split": s} for i, s in enumerate(["train", "test"])]
    source = tmp_path / "mix.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(source), split_column="split", max_length=32)
    mixture = load_mixture(cfg, load_embedded_tokenizer())
    with caplog.at_level("WARNING"):
        text = summarize_mixture(mixture, EvalConfig())
    lines = text.splitlines()
    assert lines[0] == f"data: {source}"
    table = {line.split()[0]: line.split()[1:5] for line in lines[3:5]}
    assert table == {"a": ["text", "2", "1", "1"], "b": ["text", "1", "0", "1"]}
    assert "domain 'b' has no validation rows" in caplog.text


def test_identical_runs_write_identical_checkpoints(tmp_path):
    """Every generator (torch, Python, numpy) is seeded and saved, so equal configs give equal bytes."""
    from mixsel.checkpoint import read_manifest
    from mixsel.train import train

    for name in ("a", "b"):
        cfg = _cfg(tmp_path / name, "train.max_steps=4", "train.stop_after=2", "eval.exact_match=0")
        assert train(cfg, progress=False) == {"stopped_at": 2}
    a, b = (read_manifest(tmp_path / name / "checkpoint") for name in ("a", "b"))
    assert a["files"] == b["files"] and a["step"] == 2


def test_zero_steps_only_evaluates_the_starting_model(tmp_path):
    """train.max_steps=0 scores the model as built (a pretrained model's base score): nothing is trained."""
    from mixsel.train import train

    a = train(_cfg(tmp_path / "a", "train.max_steps=0", "selection.method=random"), progress=False)
    b = train(_cfg(tmp_path / "b", "train.max_steps=0", "selection.method=big_loss", "train.lr=1.0"), progress=False)
    assert a["steps"] == 0
    assert a["test/loss_mean"] == b["test/loss_mean"] and a["val/loss_mean"] == b["val/loss_mean"]
    pa, pb = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    one = train(_cfg(tmp_path / "c", "train.max_steps=1"), progress=False)
    assert one["test/loss_mean"] != a["test/loss_mean"]  # one step does change the model


def test_a_run_reports_where_the_time_goes(tmp_path, capsys):
    """result.json's "time" (data, model, train, eval, total seconds; the parts fit in the total), the
    end-of-run line that prints it, and the start line that states the final exact match's cost."""
    import re

    from mixsel.cli import main

    assert main(["train", *FAST, f"train.output_dir={tmp_path}", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    times = json.loads((tmp_path / "result.json").read_text())["time"]
    assert set(times) == {"data_s", "model_s", "train_s", "eval_s", "total_s"}
    assert all(isinstance(v, float) and v >= 0 for v in times.values())
    total = times.pop("total_s")
    assert sum(times.values()) <= total + 0.05  # each rounded to 0.01 s
    assert times["eval_s"] > 0 and times["train_s"] > 0
    end = r"^time: data [\d.]+ s, model [\d.]+ s, train [\d.]+ s, eval [\d.]+ s, total [\d.]+ s; run folder "
    assert re.search(end, out, re.M)
    line = next(x for x in out.splitlines() if x.startswith("exact match:"))
    assert re.search(r"decodes [1-9]\d* prompts \(.+\) of up to 4 new tokens each", line)
    assert line.endswith("in a 2-step run this can take longer than training: eval.exact_match=0 switches it off")


def test_the_exact_match_line_says_how_to_switch_it_off_only_in_short_runs():
    from types import SimpleNamespace

    from mixsel.train import _exact_match_line

    split = SimpleNamespace(
        domains=["math", "prose"],
        indices_of=lambda d: [0, 1, 2] if d == 0 else [3],
        answers=["1", "2", None, None],  # prose has no reference answer: not decoded
        prompts=[[5], [6], [7], [8]],
    )
    long_run = load_config(None, ["train.max_steps=200", "eval.every=50", "eval.exact_match=5"])
    assert _exact_match_line(long_run, split) == (
        "exact match: the final test decodes 2 prompts (math 2) of up to 96 new tokens each "
        "(eval.exact_match=5 per domain, eval.max_new_tokens=96)"
    )
    short = load_config(None, ["train.max_steps=30", "eval.every=50"])  # fewer steps than eval.every
    assert _exact_match_line(short, split).endswith("eval.exact_match=0 switches it off")
    assert _exact_match_line(load_config(None, ["eval.exact_match=0"]), split) is None
