import re

import pytest

from mixsel.config import ExperimentConfig, apply_overrides, from_dict, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "selection.method=stratified", "data.domains=[a, b]"])
    assert cfg.train.max_steps == 7
    assert cfg.selection.method == "stratified"
    assert cfg.data.domains == ["a", "b"]
    assert cfg.train.lr == ExperimentConfig().train.lr


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=0.01", "selection.options={budget: uniform}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.selection.options == {"budget": "uniform"}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError, match="max_stepz.*valid keys"):
        load_config(None, ["train.max_stepz=3"])


def test_type_errors_name_the_field():
    with pytest.raises(TypeError, match="train.max_steps"):
        from_dict(ExperimentConfig, {"train": {"max_steps": "many"}})
    with pytest.raises(TypeError, match="train.resume"):
        from_dict(ExperimentConfig, {"train": {"resume": 1}})


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_repo_default_yaml_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.yaml")
    assert cfg.data.source == "embedded"
    assert cfg.train.batch_size <= cfg.train.pool_size


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="--config"):
        load_config("/nonexistent.yaml")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("eval.every=0", "eval.every"),
        ("train.max_steps=-1", "train.max_steps"),
        ("train.log_every=0", "train.log_every"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.001", "train.lr"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.batch_size=128", "train.batch_size=128 exceeds train.pool_size=64"),
        ("reweighting.update_every=0", "reweighting.update_every"),
    ],
)
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        load_config(None, [override])


def test_edge_values_are_accepted():
    cfg = load_config(None, ["eval.exact_match=0", "train.warmup_steps=0", "train.batch_size=64", "train.pool_size=64"])
    assert cfg.train.batch_size == cfg.train.pool_size == 64


def test_every_config_field_has_a_one_line_comment():
    import dataclasses
    import typing

    from mixsel.config import ExperimentConfig, field_help

    def walk(cls):
        yield cls
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp)

    for cls in walk(ExperimentConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(field_help(cls)) == names, f"{cls.__name__} fields without a comment: {names - set(field_help(cls))}"


def test_help_config_prints_fields_values_and_comments(capsys):
    from mixsel.cli import main

    assert main(["train", "--help-config", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "train.lr = 0.5  # peak AdamW learning rate" in out
    assert any(line.startswith("selection.features.val_anchors = 4  # ") for line in out)
    assert any(line.startswith("selection.features.source = auto  # ") for line in out)
    assert any(line.startswith("selection.use_weights = null  # ") for line in out)
    assert "# model.lora: LoRA adapters" in out


def test_exponent_floats_read_as_numbers(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; mixsel reads it as the float, in files and overrides alike."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  max_loss_factor: 1e1\n")
    cfg = load_config(path, ["train.weight_decay=1E-2", "train.min_lr_ratio=1.0e-1"])
    assert (cfg.train.lr, cfg.train.max_loss_factor) == (3e-4, 10.0)
    assert (cfg.train.weight_decay, cfg.train.min_lr_ratio) == (1e-2, 0.1)


def test_paths_resolve_against_the_config_file_and_overrides_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "c.yaml").write_text(
        "data:\n  source: data/mix.jsonl\n"
        "model:\n  name_or_path: HuggingFaceTB/SmolLM2-135M\n  config_file: null\n  tokenizer: ./tok\n"
        "train:\n  output_dir: ../runs/x\n"
        "reweighting:\n  options:\n    weights_from: ../runs/proxy\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "exp" / "c.yaml", ["reweighting.reference_model=runs/ref/final"])
    assert cfg.data.source == str(tmp_path / "exp" / "data" / "mix.jsonl")
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"  # a hub id is kept
    assert cfg.model.tokenizer == str(tmp_path / "exp" / "tok")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.reweighting.options["weights_from"] == str(tmp_path / "runs" / "proxy")
    assert cfg.reweighting.reference_model == str(tmp_path / "runs" / "ref" / "final")  # an override: the cwd
    # the saved config holds absolute paths, so it reloads the same from anywhere
    save_config(cfg, tmp_path / "saved.yaml")
    monkeypatch.chdir(tmp_path / "exp")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(None, ["data.source=embedded"]).data.source == "embedded"


def test_resolve_override_for_compare_files(tmp_path):
    from mixsel.config import resolve_override

    assert resolve_override("data.source=d/x.jsonl", tmp_path) == f'data.source="{tmp_path}/d/x.jsonl"'
    assert resolve_override("train.lr=0.1", tmp_path) == "train.lr=0.1"
    assert resolve_override("model.name_or_path=org/name", tmp_path) == "model.name_or_path=org/name"


def test_fingerprint_ignores_fields_that_do_not_alter_the_run():
    from mixsel.config import RESULT_SAFE_FIELDS, config_diff, config_fingerprint, run_fields

    base = load_config(None, [])
    for override in ("train.max_steps=500", "train.log_every=3", "eval.every=7", "train.threads=1", "name=x"):
        assert config_fingerprint(load_config(None, [override])) == config_fingerprint(base), override
    changed = load_config(None, ["train.lr=0.1", "selection.options={budget: uniform}"])
    diff = config_diff(run_fields(base), run_fields(changed))
    assert [d[0] for d in diff] == ["selection.options.budget", "train.lr"]
    # mixsel compare also reruns when the steps or the evaluation change
    longer = load_config(None, ["train.max_steps=500"])
    assert config_fingerprint(longer, RESULT_SAFE_FIELDS) != config_fingerprint(base, RESULT_SAFE_FIELDS)
