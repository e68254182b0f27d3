"""mixsel.errors: user errors are MixselErrors (exit 2, one line); any other exception is a bug (exit 1, file:line).

The subclasses keep the built-in types mixsel raised before, so ``except ValueError`` / ``KeyError``
/ ``TypeError`` / ``FloatingPointError`` still catch them.
"""

from __future__ import annotations

import pickle
import re

import pytest
import torch

import mixsel
from mixsel import errors
from mixsel.cli import main
from mixsel.config import ExperimentConfig, from_dict, load_config
from mixsel.errors import ConfigError, DataError, DivergedError, MixselError, OptionError, UnknownNameError
from mixsel.registry import get_reweighter, get_selector

from _fast import FAST

BUILTIN = {
    ConfigError: ValueError,
    DataError: ValueError,
    UnknownNameError: KeyError,
    OptionError: TypeError,
    DivergedError: FloatingPointError,
}


def test_mixsel_error_is_exported():
    assert mixsel.MixselError is MixselError
    assert "MixselError" in mixsel.__all__
    assert set(errors.__all__) == {"MixselError", *(cls.__name__ for cls in BUILTIN)}


def test_every_subclass_is_listed_here():
    assert set(MixselError.__subclasses__()) == set(BUILTIN)


@pytest.mark.parametrize("cls", list(BUILTIN), ids=lambda cls: cls.__name__)
def test_every_subclass_is_caught_by_its_builtin_type(cls):
    builtin = BUILTIN[cls]
    with pytest.raises(builtin, match="bad value"):
        raise cls("bad value; fix it")
    with pytest.raises(MixselError):
        raise cls("bad value; fix it")
    try:
        raise cls("bad value; fix it")
    except builtin as err:  # the way callers catch it
        assert isinstance(err, MixselError)
    # pickles (exceptions cross processes under torchrun / multiprocessing)
    again = pickle.loads(pickle.dumps(cls("bad value")))
    assert type(again) is cls and str(again) == "bad value"


def test_unknown_name_error_reads_without_keyerror_quotes():
    assert str(UnknownNameError("unknown selector 'x'")) == "unknown selector 'x'"


def test_unknown_selector_is_an_unknown_name_error():
    with pytest.raises(UnknownNameError, match="unknown selector 'nope'; valid names: .*random") as info:
        get_selector("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, MixselError)
    with pytest.raises(KeyError):  # as before
        get_reweighter("nope", domains=["a"])


def test_unknown_and_missing_options_are_option_errors():
    with pytest.raises(OptionError, match=r"selector 'random' got an unexpected keyword argument 'foo' \(its options"):
        get_selector("random", foo=1)
    with pytest.raises(OptionError, match="reweighter 'uniform'"):
        get_reweighter("uniform", domains=["a", "b"], nope=1)


@pytest.mark.parametrize(
    ("name", "options", "expect"),
    [
        ("colm", {"h": "abc"}, "option h='abc' has the wrong type: expected an integer"),
        ("big_loss", {"shares": 3}, "option shares=3 has the wrong type: expected a list of numbers or null"),
        ("big_loss", {"minimum": None}, "expected an integer"),
        ("middle_ppl", {"quantile": "half"}, "expected a number"),
        ("greats", {"second_order": "yes"}, "expected true/false"),
    ],
)
def test_an_option_of_the_wrong_type_is_an_option_error(name, options, expect):
    with pytest.raises(OptionError, match=re.escape(expect)):
        get_selector(name, **options)


def test_options_of_the_right_kind_still_pass():
    import numpy as np

    get_selector("big_loss", budget="fixed", shares=np.array([1.0, 2.0]))
    get_selector("big_loss", budget="fixed", shares=(1, 2))
    get_selector("colm", h=np.int64(8), adam_eps=0)
    get_reweighter("static", domains=["a", "b"], weights=torch.tensor([1.0, 2.0]))
    get_reweighter("doremi", domains=["a", "b"], initial_weights={"a": 1, "b": 2}, step_size=np.float32(0.5))


def test_config_mistakes_are_mixsel_errors():
    with pytest.raises(UnknownNameError, match="unknown config key"):
        from_dict(ExperimentConfig, {"nope": 1})
    with pytest.raises(OptionError, match="train.lr: expected a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=-1"])


def test_divergence_is_a_diverged_error(tmp_path):
    from mixsel.train import _check_finite_weights

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match="training diverged") as info:
        _check_finite_weights(model, 3, tmp_path)
    assert isinstance(info.value, FloatingPointError)


# ---- the CLI: MixselError -> exit 2; a bug's KeyError / TypeError -> exit 1 with where it came from -----------


def _train_args(tmp_path, *overrides):
    return ["train", "-q", *FAST, "train.max_steps=2", f"train.output_dir={tmp_path}/out", *overrides]


def test_cli_user_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(_train_args(tmp_path, "selection.method=nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixsel: error: unknown selector 'nope'; valid names:"), err


def test_cli_option_of_the_wrong_type_is_exit_2(tmp_path, capsys):
    assert main(_train_args(tmp_path, "selection.method=colm", "selection.options={h: abc}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixsel: error: selection.options for 'colm': "), err
    assert "h='abc' has the wrong type" in err[0]


def _bug_keyerror(*args, **kwargs):
    return {}["x"]


def _bug_typeerror(*args, **kwargs):
    return len(3)


@pytest.mark.parametrize(("bug", "kind"), [(_bug_keyerror, "KeyError"), (_bug_typeerror, "TypeError")])
def test_cli_a_bug_is_an_internal_error_with_file_and_line(tmp_path, capsys, monkeypatch, bug, kind):
    import mixsel.train

    monkeypatch.delenv("MIXSEL_DEBUG", raising=False)
    monkeypatch.setattr(mixsel.train, "init_world", bug)  # in the train path, after the checks
    assert main(_train_args(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"mixsel: internal error: {kind}: "), line
    fn = bug.__name__
    assert re.search(rf"at \S*test_errors\.py:\d+ in {fn}, from mixsel/train\.py:\d+ in _start ", line), line
    assert "a bug: rerun with MIXSEL_DEBUG=1" in line
    assert "mixsel: error:" not in line


def test_cli_debug_reraises_the_bug(tmp_path, monkeypatch):
    import mixsel.train

    monkeypatch.setenv("MIXSEL_DEBUG", "1")
    monkeypatch.setattr(mixsel.train, "init_world", _bug_keyerror)
    with pytest.raises(KeyError, match="x"):
        main(_train_args(tmp_path))


def test_where_names_a_mixsel_frame_by_its_package_path():
    from mixsel.cli import _where

    with pytest.raises(OptionError) as info:
        get_selector("random", seed_salt=None)
    assert re.fullmatch(r"mixsel/registry\.py:\d+ in _check_types", _where(info.value)), _where(info.value)
