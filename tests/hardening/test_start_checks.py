"""Nothing fails at the end that can be checked at the start (issue 33 items 2, 4, 5, 7, 8).

Answer checkers are imported only when ``eval.exact_match > 0``, must be plain Python functions of
(prediction, reference) from the user's own code (or :mod:`mixsel.answers`) and are called once at
start; loggers are checked installed; models, tokenizers and configs load with an explicit
``trust_remote_code``; duplicate YAML keys are errors; the TRL trainer drops degenerate rows with a
count and refuses an empty eval set in one line; DoGraph's objective survives a resume. The CLI rows
that fit one-line-rc-2-nothing-changed live in ``test_bad_inputs.py`` (``start/...`` and others).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mixsel.cli import main
from mixsel.config import load_config

from _fast import FAST

pytest.importorskip("transformers")


def _module(tmp_path: Path, monkeypatch, name: str, source: str) -> None:
    """Write the module ``name`` into ``tmp_path/mods`` and make it importable (no bytecode written)."""
    folder = tmp_path / "mods"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, name, raising=False)


def _refused(argv: list[str], capsys) -> str:
    """Run ``mixsel argv`` in-process; exit status 2 and one stderr line, which is returned."""
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mixsel: error: ") and "Traceback" not in lines[0]
    return lines[0]


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "-q", *FAST, "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}", *extra]


# ---- answer checkers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("def check(p, r:\n    return True\n", "module 'bad_checker' has a syntax error at "),
        ("raise RuntimeError('no config')\n", "importing module 'bad_checker' raised RuntimeError: no config"),
        ("import no_such_dependency_xyz\n", "cannot import 'bad_checker' (No module named 'no_such_dependency_xyz')"),
        ("from shutil import rmtree as check\n", "'check' is from Python's standard library or an installed package"),
        ("check = print\n", "is a builtin_function_or_method, not a Python function"),
        ("import functools\ncheck = functools.partial(lambda a, b, c: True, 1)\n", "is a partial"),
        ("class check:\n    def __init__(self, p, r):\n        pass\n", "is a type, not a Python function"),
        ("def check(prediction, reference, extra):\n    return True\n", "check(prediction, reference, extra) cannot"),
        ("def check(prediction, reference):\n    return None\n", "returned NoneType"),
        ("def check(prediction, reference):\n    return 0.5\n", "returned float"),
    ],
    ids=["syntax", "raises", "missing-dependency", "stdlib", "builtin", "partial", "class", "arity", "none", "float"],
)
def test_a_checker_that_cannot_work_fails_at_start_in_one_line(tmp_path, monkeypatch, capsys, source, expect):
    _module(tmp_path, monkeypatch, "bad_checker", source)
    line = _refused(_train_args(tmp_path, "eval.answer_checker=bad_checker:check"), capsys)
    assert "eval.answer_checker='bad_checker:check'" in line and expect in line, line
    assert not (tmp_path / "run").exists()  # nothing written: it failed before the run folder


def test_the_syntax_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    _module(tmp_path, monkeypatch, "bad_checker", "x = 1\ndef check(p, r:\n    return True\n")
    line = _refused(_train_args(tmp_path, "eval.answer_checker=bad_checker:check"), capsys)
    assert f"{tmp_path / 'mods' / 'bad_checker.py'}:2" in line, line


def test_checkers_that_are_accepted(tmp_path, monkeypatch):
    """User functions (def, lambda), numpy-free bools and 0/1, and mixsel's own checkers by path."""
    from mixsel.answers import check_answer_checkers, get_checker

    source = (
        "def strict(prediction, reference, *, unused=1):\n    return prediction.endswith(reference)\n"
        "loose = lambda prediction, reference: int(reference in prediction)\n"
        "def anything(*args):\n    return True\n"
    )
    _module(tmp_path, monkeypatch, "good_checker", source)
    check_answer_checkers(
        {"a": "good_checker:strict", "b": "good_checker:loose", "c": "good_checker:anything", "*": "sympy"}
    )
    check_answer_checkers("mixsel.answers:check_exact")
    assert get_checker("mixsel.answers:check_numeric")("#### 0.5", "1/2")


def test_the_checker_is_called_once_at_start_on_the_sample_pair():
    import _checkers
    from mixsel.answers import PROBE_PAIR
    from mixsel.preflight import check_methods

    _checkers.CALLS.clear()
    check_methods(load_config(None, [*FAST, "eval.answer_checker={'*': _checkers:accept, x: _checkers:accept}"]))
    assert _checkers.CALLS == [PROBE_PAIR]


def test_no_checker_is_imported_without_exact_match(tmp_path, capsys):
    """eval.exact_match=0: a checker that would fail is never imported, and the run trains and ends."""
    from mixsel.train import train

    assert "unimportable_checker_xyz" not in sys.modules
    never = "eval.answer_checker={'*': unimportable_checker_xyz:check}"
    cfg = load_config(None, [*FAST, "train.max_steps=1", "eval.exact_match=0", f"train.output_dir={tmp_path}", never])
    result = train(cfg, progress=False)
    assert "test/loss_mean" in result and not any("exact_match" in k for k in result)


def test_a_checker_raising_at_the_end_names_the_row(tmp_path):
    """Fine on the sample pair, it raises on a model's generation: one line naming checker, domain and row."""
    import _checkers  # noqa: F401 - importable from tests/
    from mixsel.train import train

    cfg = load_config(
        None,
        [*FAST, "train.max_steps=1", f"train.output_dir={tmp_path}", "eval.answer_checker=_checkers:only_on_probe"],
    )
    with pytest.raises(ValueError, match=r"eval.answer_checker='_checkers:only_on_probe' raised ValueError") as info:
        train(cfg, progress=False)
    assert "on test row " in str(info.value) and "of domain " in str(info.value)


# ---- loggers, weights_from, compare outputs -----------------------------------------------------------------------


def test_report_to_checks_the_package(monkeypatch):
    import mixsel.logging as mlog

    mlog.check_report_to(["jsonl", "none"])
    monkeypatch.setattr(mlog, "_installed", lambda package: package != "wandb")
    mlog.check_report_to(["tensorboard"])
    with pytest.raises(ValueError, match=r"train.report_to has wandb but wandb is not installed: pip install wandb"):
        mlog.check_report_to(["tensorboard", "wandb"])


def test_weights_from_reads_a_result_and_refuses_other_files(tmp_path):
    from mixsel.reweighting.static import read_weights_from

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(
        json.dumps({"domains": ["a", "b"], "final_weights": [0.25, 0.75], "average_weights": [0.5, 0.5]})
    )
    assert read_weights_from(tmp_path / "run") == {"a": 0.5, "b": 0.5}
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04\x80\x81")
    with pytest.raises(ValueError, match=r"is a binary \(not UTF-8\) file \(byte 0x80 at offset 4\)"):
        read_weights_from(tmp_path / "w.pt")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is it a mixsel result.json"):
        read_weights_from(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="weights_from"):
        read_weights_from(tmp_path / "nope")


@pytest.mark.parametrize("name", ["summary.json", "summary.md", "plots", "SUMMARY.JSON"])
def test_compare_refuses_a_run_named_after_its_outputs(tmp_path, name):
    from mixsel.compare import load_compare_spec

    (tmp_path / "cmp.yaml").write_text(json.dumps({"runs": {"random": [], name: []}}))
    with pytest.raises(ValueError, match=f"run name '{name}' clashes with what mixsel compare writes"):
        load_compare_spec(tmp_path / "cmp.yaml")


# ---- duplicate YAML keys --------------------------------------------------------------------------------------------


def test_duplicate_keys_name_file_and_line_and_merge_keys_still_work(tmp_path):
    from mixsel.compare import load_compare_spec
    from mixsel.config import parse_yaml

    assert parse_yaml("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n")["run"] == {"x": 3, "y": 2}
    with pytest.raises(ValueError, match=r"^c.yaml:4:5: duplicate key 'x' \(first at line 3\)"):
        parse_yaml("a:\n  b:\n    x: 1\n    x: 2\n", "c.yaml")
    (tmp_path / "cmp.yaml").write_text("seeds: [0]\nruns:\n  random: []\nseeds: [1]\n")
    with pytest.raises(ValueError, match=r"cmp.yaml:4:1: duplicate key 'seeds' \(first at line 1\)"):
        load_compare_spec(tmp_path / "cmp.yaml")


# ---- trust_remote_code ----------------------------------------------------------------------------------------------


def test_every_load_passes_trust_remote_code_explicitly(tmp_path, monkeypatch):
    import transformers

    from mixsel.config import ModelConfig
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.model import build_model, build_tokenizer

    assert ModelConfig().trust_remote_code is False
    tok = load_embedded_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    fresh = build_model(ModelConfig(config_file="embedded:micro-llama"), tok)
    fresh.save_pretrained(tmp_path / "m")
    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    real_from_config = transformers.AutoModelForCausalLM.from_config.__func__

    def spy_config(klass, *args, **kwargs):
        seen.append(("from_config", kwargs.get("trust_remote_code", "absent")))
        return real_from_config(klass, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", classmethod(spy_config))
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    build_model(cfg, build_tokenizer(cfg))
    build_model(ModelConfig(config_file="embedded:micro-llama"), tok)
    assert seen == [("AutoTokenizer", False), ("AutoModelForCausalLM", False), ("from_config", False)]


def test_auto_map_folders(tmp_path):
    """auto_map for a class transformers lacks: refused unless trusted; for one it has: its own class."""
    from mixsel.model import check_model_source

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    check_model_source(str(folder), "model.name_or_path")  # transformers loads its own LlamaForCausalLM
    (folder / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ValueError, match=r"model.name_or_path='.*' ships its own Python code \(auto_map in config"):
        check_model_source(str(folder), "model.name_or_path")
    check_model_source(str(folder), "model.name_or_path", trust_remote_code=True)


def test_a_custom_code_model_is_refused_by_transformers_too(tmp_path, monkeypatch):
    """Past the start check (say a hub id), transformers' own refusal becomes the same line."""
    import mixsel.model as mm
    from mixsel.config import ModelConfig

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "x.Y"}}))
    (folder / "x.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    monkeypatch.setattr(mm, "check_model_source", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match=r"ships its own Python code .* model.trust_remote_code=true"):
        mm.build_model(ModelConfig(name_or_path=str(folder)))
    assert not (tmp_path / "ran").exists()


# ---- TRL: degenerate rows and empty datasets ------------------------------------------------------------------------


def _trl_rows():
    datasets = pytest.importorskip("datasets")
    user, reply = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
    rows = [{"messages": [user, reply], "domain": d} for d in ("a", "b") for _ in range(6)]
    rows += [
        {"messages": [user], "domain": "a"},  # no assistant turn
        {"messages": [user, {"role": "assistant", "content": "  "}], "domain": "b"},  # an empty one
        {"messages": [reply, user], "domain": "b"},  # an assistant turn (the last turn is the user's)
    ]
    return datasets, rows


def test_trl_drops_degenerate_rows_with_one_counting_warning():
    pytest.importorskip("trl")
    from mixsel.integrations.trl import drop_degenerate_rows

    datasets, rows = _trl_rows()
    with pytest.warns(UserWarning, match=r"dropped 2 of 15 train_dataset rows .* \(per domain: \{'a': 1, 'b': 1\}\)"):
        kept = drop_degenerate_rows(datasets.Dataset.from_list(rows), "train_dataset")
    assert len(kept) == 13
    pairs = datasets.Dataset.from_list([{"prompt": "Q?", "completion": c, "domain": "a"} for c in ("A", "", "  ", "B")])
    with pytest.warns(UserWarning, match="dropped 2 of 4 eval_dataset rows"):
        assert drop_degenerate_rows(pairs, "eval_dataset")["completion"] == ["A", "B"]
    user = [{"role": "user", "content": "Q?"}]
    turns = datasets.Dataset.from_list(
        [{"prompt": user, "completion": [{"role": "assistant", "content": c}], "domain": "a"} for c in ("A", " ")]
    )
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        assert len(drop_degenerate_rows(turns, "eval_dataset")) == 1
    text = datasets.Dataset.from_list([{"text": t, "domain": "a"} for t in ("x", "", "y")])
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        assert len(drop_degenerate_rows(text, "train_dataset")) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = datasets.Dataset.from_list(rows[:12])
        assert drop_degenerate_rows(clean, "train_dataset") is clean  # nothing dropped, nothing copied
    emptied = datasets.Dataset.from_list([*rows[:6], {"messages": [rows[0]["messages"][0]], "domain": "c"}])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="train_dataset: domain 'c' is empty"):
        drop_degenerate_rows(emptied, "train_dataset")


def _trl_trainer(tmp_path, train, val):
    pytest.importorskip("trl")
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer

    from conftest import make_tiny_llama

    tok = load_embedded_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    args = SelectionSFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        pool_factor=2,
        max_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    model = make_tiny_llama(vocab_size=len(tok))
    return SelectionSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok)


def test_trl_trainer_drops_rows_before_trl_prepares_them(tmp_path):
    datasets, rows = _trl_rows()
    with pytest.warns(UserWarning, match="dropped 2 of 15 train_dataset rows"):
        trainer = _trl_trainer(tmp_path, datasets.Dataset.from_list(rows), None)
    assert len(trainer.train_dataset) == 13


@pytest.mark.parametrize("which", ["eval", "train", "eval-dict"])
def test_trl_empty_dataset_is_one_line(tmp_path, which):
    datasets, rows = _trl_rows()
    full, empty = datasets.Dataset.from_list(rows[:12]), datasets.Dataset.from_list(rows[:12]).select([])
    train, val = (empty, None) if which == "train" else (full, {"x": empty} if which == "eval-dict" else empty)
    name = {"eval": "eval_dataset", "train": "train_dataset", "eval-dict": "eval_dataset['x']"}[which]
    with pytest.raises(ValueError, match=rf"SelectionSFTTrainer: {re_escape(name)} has no rows"):
        _trl_trainer(tmp_path, train, val)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# ---- DoGraph: the objective is checkpointed --------------------------------------------------------------------------


def test_dograph_objective_is_logged_after_a_resume(tmp_path):
    from mixsel.train import train

    def run(out, *extra):
        dograph = ["reweighting.method=dograph", "reweighting.projection_dim=16"]
        cfg = load_config(
            None, [*FAST, "train.max_steps=4", "eval.exact_match=0", *dograph, f"train.output_dir={out}", *extra]
        )
        return train(cfg, progress=False)

    run(tmp_path / "straight")
    assert run(tmp_path / "cut", "train.stop_after=2") == {"stopped_at": 2}
    run(tmp_path / "cut", "train.resume=true")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("straight", "cut")
    }
    assert [r["step"] for r in rows["cut"]] == [1, 2, 3, 4]
    for a, b in zip(rows["straight"], rows["cut"], strict=True):
        assert "dograph/objective" in b, b["step"]
        assert a["dograph/objective"] == b["dograph/objective"]


def test_dograph_state_round_trips_the_objective_and_reads_older_states():
    from mixsel import get_reweighter
    from mixsel.types import DomainStats

    rw = get_reweighter("dograph", domains=["a", "b"])
    g = torch.Generator().manual_seed(0)
    stats = DomainStats(
        counts=torch.tensor([2.0, 2.0]),
        loss_sum=torch.tensor([1.0, 2.0]),
        grad=torch.randn(2, 8, generator=g, dtype=torch.float64),
        val_grad=torch.randn(2, 8, generator=g, dtype=torch.float64),
    )
    rw.update(stats)
    state = rw.state_dict()
    assert state["last_objectives"].numel() > 0
    again = get_reweighter("dograph", domains=["a", "b"])
    again.load_state_dict(state)
    assert again.log_dict() == rw.log_dict()
    del state["last_objectives"]  # a checkpoint of an older version
    older = get_reweighter("dograph", domains=["a", "b"])
    older.load_state_dict(state)
    assert "dograph/objective" not in older.log_dict()
