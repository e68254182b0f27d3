"""Every bad input gets one clear line, exit status 2, and leaves every file as it was.

One row per bad input, grouped by class (the row ids start with the class). Each CLI row runs
``mixsel ...`` in-process in a fresh folder and asserts: exit status 2, exactly one stderr line, the
line names the field (or file) at fault, and every file that existed before (the row's bad files, a
copy of a trained run folder) is byte-for-byte unchanged and nothing new was written ("fault" rows,
which train a few steps before failing, check that the last good checkpoint is unchanged). Most rows
fail at validation, before data or a model are loaded; the "data" rows and a few "paths" rows load a
few rows of data (milliseconds to seconds). Rows of the Python API check the ``ValueError`` text; a
few rows run as real processes, to check that no log line, warning or traceback reaches stderr.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import mixsel
from mixsel.cli import main

from _fast import FAST

pytest.importorskip("transformers")

OUT = "train.output_dir={tmp}/out"


def _train(*overrides: str) -> tuple[str, ...]:
    """``mixsel train -q`` with the fast settings, a fresh run folder, then ``overrides`` (which win)."""
    return ("train", "-q", *FAST, "eval.exact_match=0", "train.max_steps=4", OUT, *overrides)


def _resume(*overrides: str) -> tuple[str, ...]:
    """``mixsel train --resume`` of the trained run copied to ``{tmp}/run``."""
    return (*_train("train.output_dir={tmp}/run", *overrides), "--resume")


@dataclass(frozen=True)
class Row:
    """One bad input.

    Attributes:
        id: ``<class>/<what>``.
        args: the CLI arguments after ``mixsel``; ``{tmp}`` is the row's folder.
        expect: a substring of the error line (the field, file or flag at fault).
        setup: writes the row's files into ``{tmp}`` (a trained run is copied to ``{tmp}/run`` when
            ``args`` mention it).
        patch: ``(monkeypatch) -> None`` for faults that cannot be typed (a full disk, a NaN).
        keep: paths (relative to ``{tmp}``) that must stay byte-for-byte unchanged; ``None`` = all of
            ``{tmp}``, with nothing added.
    """

    id: str
    args: tuple[str, ...]
    expect: str
    setup: Callable[[Path], Any] | None = None
    patch: Callable[[Any], Any] | None = None
    keep: tuple[str, ...] | None = None


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for one in setups:
            one(tmp)

    return setup


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DATA = _jsonl([{"domain": d, "text": f"{d} row {i} " * 3} for d in ("a", "b") for i in range(12)])


def _gz_truncated(tmp: Path) -> None:
    blob = gzip.compress(DATA.encode())
    (tmp / "data.jsonl.gz").write_bytes(blob[: len(blob) // 2])


def _features(**tensors: Any) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        torch.save(tensors, tmp / "feats.pt")

    return setup


def _evil(tmp: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    torch.save({"domains": torch.tensor([0, 1]), "loss": Evil()}, tmp / "feats.pt")


def _truncated_features(tmp: Path) -> None:
    torch.save({"domains": torch.tensor([0, 1, 0]), "loss": torch.rand(3)}, tmp / "feats.pt")
    blob = (tmp / "feats.pt").read_bytes()
    (tmp / "feats.pt").write_bytes(blob[: len(blob) // 2])


def _corrupt_both(tmp: Path) -> None:
    for name in ("checkpoint", "checkpoint.prev"):
        path = tmp / "run" / name / "state.pt"
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))


def _no_fingerprint(tmp: Path) -> None:
    from mixsel.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(tmp / "run")
    state.pop("run_config")
    shutil.rmtree(tmp / "run" / "checkpoint.prev")
    save_checkpoint(tmp / "run", state)
    shutil.rmtree(tmp / "run" / "checkpoint.prev")


def _drop_checkpoints(tmp: Path) -> None:
    for name in ("checkpoint", "checkpoint.prev"):
        shutil.rmtree(tmp / "run" / name)


def _micro_model_folder(tmp: Path, name: str) -> Path:
    """The micro Llama's config.json (and no weights) in ``tmp/name``."""
    from mixsel.model import resolve_config_file

    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    fields = json.loads(resolve_config_file("embedded:micro-llama").read_text())
    fields.setdefault("model_type", "llama")
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def _pickled_weights(tmp: Path) -> None:
    """A model folder whose pytorch_model.bin runs code when unpickled."""
    folder = _micro_model_folder(tmp, "pick")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil()}, folder / "pytorch_model.bin")


def _custom_code(tmp: Path) -> None:
    """A model folder whose config.json needs the folder's own code (auto_map, a type transformers lacks)."""
    folder = _micro_model_folder(tmp, "custom")
    fields = json.loads((folder / "config.json").read_text())
    fields.update(model_type="my_llama", auto_map={"AutoModelForCausalLM": "modeling_my.MyLlama"})
    (folder / "config.json").write_text(json.dumps(fields))
    (folder / "modeling_my.py").write_text(f"open({str(tmp / 'pwned')!r}, 'w')\n")


def _custom_tokenizer(tmp: Path) -> None:
    """A tokenizer folder whose tokenizer_config.json asks for the folder's own tokenizer class."""
    folder = tmp / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "MyTokenizer", "auto_map": {"AutoTokenizer": ["tok_my.MyTokenizer", None]}})
    )
    (folder / "tok_my.py").write_text(f"open({str(tmp / 'pwned')!r}, 'w')\n")


def _not_installed(monkeypatch: Any) -> None:
    import mixsel.logging

    monkeypatch.setattr(mixsel.logging, "_installed", lambda package: False)


def _disk_full(monkeypatch: Any) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)


def _nan_loss(monkeypatch: Any) -> None:
    import mixsel.features.loss as loss_mod

    real = loss_mod.token_losses  # the training step's per-token losses
    monkeypatch.setattr(loss_mod, "token_losses", lambda logits, labels: real(logits, labels) * float("nan"))


def _compare(id: str, spec: dict[str, Any] | str, expect: str) -> Row:
    """A row running ``mixsel compare`` on the compare file ``spec`` (YAML text, or a mapping)."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return Row(id, ("compare", "-q", "--config", "{tmp}/cmp.yaml"), expect, _write("cmp.yaml", text))


def _cmp(runs: Any, **more: Any) -> dict[str, Any]:
    return {"overrides": [*FAST, "train.max_steps=1"], "output_dir": "out", "runs": runs, **more}


def _sel(method: str, k: str, *options: str) -> tuple[str, ...]:
    extra = [arg for option in options for arg in ("--option", option)]
    return ("select", "--features", "{tmp}/feats.pt", "--method", method, "--k", k, *extra)


SELECT = _sel("big_loss", "2")
GOOD = {"domains": torch.tensor([0, 1, 0, 1]), "loss": torch.rand(4)}
CHECKPOINTS = ("run/checkpoint", "run/checkpoint.prev")

ROWS: list[Row] = [
    # ---- config files: syntax, encoding, shape ----------------------------------------------------------------
    Row(
        "config-file/yaml-syntax",
        ("train", "--config", "{tmp}/bad.yaml"),
        "bad.yaml:4:1: invalid YAML",
        _write("bad.yaml", "train:\n  lr: 0.1\n  max_steps: [1,\n"),
    ),
    Row(
        "config-file/tab-indent",
        ("train", "--config", "{tmp}/bad.yaml"),
        "bad.yaml:2:",
        _write("bad.yaml", "train:\n\tlr: 0.1\n"),
    ),
    Row("config-file/is-a-folder", ("train", "--config", "{tmp}"), "is a folder"),
    Row("config-file/missing", ("train", "--config", "{tmp}/nope.yaml"), "nope.yaml"),
    Row(
        "config-file/not-utf8",
        ("train", "--config", "{tmp}/bad.yaml"),
        "not UTF-8 text (byte 0xff at offset 18)",
        _write("bad.yaml", b"train:\n  name: caf\xff\n"),
    ),
    Row(
        "config-file/top-level-list",
        ("train", "--config", "{tmp}/bad.yaml"),
        "mapping",
        _write("bad.yaml", "- train\n- eval\n"),
    ),
    Row(
        "config-file/unknown-key",
        ("train", "--config", "{tmp}/bad.yaml"),
        "max_stepz",
        _write("bad.yaml", "train:\n  max_stepz: 3\n"),
    ),
    Row(
        "config-file/section-not-mapping",
        ("train", "--config", "{tmp}/bad.yaml"),
        "train",
        _write("bad.yaml", "train: 3\n"),
    ),
    Row(
        "config-file/duplicate-key",
        ("train", "--config", "{tmp}/bad.yaml"),
        "bad.yaml:3:3: duplicate key 'lr' (first at line 2)",
        _write("bad.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    Row(
        "config-file/duplicate-section",
        ("train", "--config", "{tmp}/bad.yaml"),
        "bad.yaml:3:1: duplicate key 'train'",
        _write("bad.yaml", "train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n"),
    ),
    Row(
        "config-file/bad-value",
        ("train", "--config", "{tmp}/bad.yaml"),
        "train.lr",
        _write("bad.yaml", "train:\n  lr: fast\n"),
    ),
    # ---- values typed on the command line ---------------------------------------------------------------------
    Row("config-value/lr-word", _train("train.lr=abc"), "train.lr"),
    Row("config-value/steps-word", _train("train.max_steps=ten"), "train.max_steps"),
    Row("config-value/steps-fraction", _train("train.max_steps=2.5"), "train.max_steps"),
    Row("config-value/bool-as-int", _train("train.log_selections=1"), "train.log_selections"),
    Row("config-value/no-equals", _train("train.max_steps"), "section.key=value"),
    Row("config-value/empty-key", _train("=3"), "empty key"),
    Row("config-value/unknown-key", _train("train.max_stepz=1"), "max_stepz"),
    Row("config-value/unclosed-list", _train("train.max_steps=[1,"), "train.max_steps"),
    Row("config-value/domains-string", _train("data.domains=3"), "data.domains"),
    Row("config-value/options-not-mapping", _train("selection.options=3"), "selection.options"),
    Row("config-value/threads-word", _train("train.threads=many"), "train.threads"),
    Row("config-value/duplicate-option", _train("selection.options={a: 1, a: 2}"), "duplicate key 'a'"),
    # ---- values out of range ----------------------------------------------------------------------------------
    Row("config-range/lr-inf", _train("train.lr=.inf"), "train.lr"),
    Row("config-range/lr-nan", _train("train.lr=.nan"), "train.lr"),
    Row("config-range/lr-zero", _train("train.lr=0"), "train.lr"),
    Row("config-range/lr-negative", _train("train.lr=-1e-3"), "train.lr"),
    Row("config-range/grad-clip-negative", _train("train.grad_clip=-1"), "train.grad_clip"),
    Row("config-range/threads-negative", _train("train.threads=-2"), "train.threads"),
    Row("config-range/threads-zero", _train("train.threads=0"), "train.threads"),
    Row("config-range/batch-over-pool", _train("train.batch_size=16", "train.pool_size=8"), "train.pool_size"),
    Row("config-range/min-lr-ratio", _train("train.min_lr_ratio=2"), "train.min_lr_ratio"),
    Row("config-range/weight-decay-nan", _train("train.weight_decay=.nan"), "train.weight_decay"),
    Row("config-range/stop-after-zero", _train("train.stop_after=0"), "train.stop_after"),
    Row("config-range/max-length", _train("data.max_length=1"), "data.max_length"),
    Row("config-range/val-per-domain", _train("data.val_per_domain=-1"), "data.val_per_domain"),
    Row("config-range/lora-rank", _train("model.lora.r=0"), "model.lora.r"),
    Row("config-range/lora-dropout", _train("model.lora.dropout=1.5"), "model.lora.dropout"),
    Row("config-range/zo-eps", _train("selection.features.zo_eps=0"), "selection.features.zo_eps"),
    Row("config-range/eval-every", _train("eval.every=0"), "eval.every"),
    Row("config-range/max-loss-factor", _train("train.max_loss_factor=0.5"), "train.max_loss_factor"),
    Row("config-range/projection-dim", _train("reweighting.projection_dim=0"), "reweighting.projection_dim"),
    Row("config-range/dtype", _train("model.dtype=int8"), "model.dtype"),
    Row("config-range/autocast-fp16", _train("train.autocast=fp16"), "train.autocast"),
    Row("config-range/distributed-selection", _train("train.distributed_selection=all"), "train.distributed_selection"),
    Row("config-range/data-format", _train("data.format=xml"), "data.format"),
    Row("config-range/device-name", _train("train.device=gpu"), "train.device"),
    Row("config-range/output-dir-empty", _train('train.output_dir=""'), "train.output_dir"),
    Row("config-range/device-cuda", _train("train.device=cuda"), "no CUDA device"),
    # ---- method names, options and needs (checked before data and model) -----------------------------------------
    Row("methods/unknown-selector", _train("selection.method=nope"), "unknown selector 'nope'"),
    Row("methods/unknown-reweighter", _train("reweighting.method=nope"), "unknown reweighter 'nope'"),
    Row("methods/unknown-option", _train("selection.options={bogus: 1}"), "selection.options"),
    Row(
        "methods/shares-without-fixed",
        _train("selection.method=partitionsel", "selection.options={shares: [1, 1]}"),
        "budget=fixed",
    ),
    Row(
        "methods/shares-negative",
        _train("selection.method=partitionsel", "selection.options={budget: fixed, shares: [-1, 2]}"),
        "shares",
    ),
    Row(
        "methods/shares-nan",
        _train("selection.method=partitionsel", "selection.options={budget: fixed, shares: [.nan, 1]}"),
        "shares",
    ),
    Row("methods/budget-policy", _train("selection.method=partitionsel", "selection.options={budget: most}"), "budget"),
    Row(
        "methods/no-anchors",
        _train("selection.method=partitionsel", "selection.features.val_anchors=0"),
        "selection.features.val_anchors",
    ),
    Row("methods/no-reference", _train("reweighting.method=doremi"), "reweighting.reference_model"),
    # ---- what the end of a run uses, checked at its start (answer checkers, loggers) ----------------------------
    Row(
        "start/checker-one-argument",
        _train("eval.exact_match=1", "eval.answer_checker=_checkers:one_argument"),
        "eval.answer_checker='_checkers:one_argument': one_argument(prediction) cannot be called",
    ),
    Row("start/checker-builtin", _train("eval.exact_match=1", "eval.answer_checker=os:getcwd"), "built into Python"),
    Row("start/checker-popen", _train("eval.exact_match=1", "eval.answer_checker=os:popen"), "eval.answer_checker"),
    Row(
        "start/checker-stdlib",
        _train("eval.exact_match=1", "eval.answer_checker=shutil:rmtree"),
        "standard library or an installed package",
    ),
    Row(
        "start/checker-other-mixsel",
        _train("eval.exact_match=1", "eval.answer_checker=mixsel.runfolder:plan_run_folder"),
        "mixsel code other than mixsel.answers",
    ),
    Row("start/checker-not-a-function", _train("eval.exact_match=1", "eval.answer_checker=_checkers:CALLS"), "list"),
    Row("start/checker-raises", _train("eval.exact_match=1", "eval.answer_checker=_checkers:raises"), "RuntimeError"),
    Row(
        "start/checker-returns-text",
        _train("eval.exact_match=1", "eval.answer_checker=_checkers:returns_text"),
        "returned str 'yes'",
    ),
    Row(
        "start/checker-per-domain",
        _train("eval.exact_match=1", "eval.answer_checker={chemistry: os:system}"),
        "eval.answer_checker='os:system'",
    ),
    Row(
        "start/checker-missing-module",
        _train("eval.exact_match=1", "eval.answer_checker=no_such_module_xyz:check"),
        "cannot import 'no_such_module_xyz'",
    ),
    Row("start/wandb-missing", _train("train.report_to=[wandb]"), "wandb is not installed", patch=_not_installed),
    Row(
        "start/tensorboard-missing",
        _train("train.report_to=[tensorboard]"),
        "tensorboard is not installed",
        patch=_not_installed,
    ),
    # ---- model, tokenizer, reference and data paths -------------------------------------------------------------
    Row("paths/model-typo", _train("model.name_or_path=modls/typo"), "not a local folder, and the hub is offline"),
    Row(
        "paths/model-folder-empty",
        _train("model.name_or_path={tmp}/empty"),
        "model.name_or_path",
        _write("empty/notes.txt", "x"),
    ),
    Row("paths/model-is-file", _train("model.name_or_path={tmp}/m.txt"), "model.name_or_path", _write("m.txt", "x")),
    Row(
        "paths/tokenizer-folder-empty",
        _train("model.tokenizer={tmp}/empty"),
        "model.tokenizer",
        _write("empty/notes.txt", "x"),
    ),
    Row(
        "paths/reference-missing",
        _train("reweighting.method=doremi", "reweighting.reference_model={tmp}/nope"),
        "reweighting.reference_model",
    ),
    Row("paths/config-file-missing", _train("model.config_file={tmp}/nope.json"), "model.config_file"),
    Row("paths/config-file-packaged", _train("model.config_file=embedded:huge"), "model.config_file"),
    Row(
        "paths/config-file-not-json",
        _train("model.config_file={tmp}/m.json"),
        "model.config_file",
        _write("m.json", "{not json"),
    ),
    Row("paths/data-missing", _train("data.source={tmp}/nope.jsonl"), "data.source"),
    Row(
        "paths/weights-from-missing",
        _train("reweighting.method=static", "reweighting.options={weights_from: {tmp}/nope}"),
        "weights_from",
    ),
    Row(
        "paths/weights-from-binary",
        _train("reweighting.method=static", "reweighting.options={weights_from: {tmp}/w.bin}"),
        "weights_from='",
        _write("w.bin", bytes(range(256))),
    ),
    Row(
        "paths/weights-from-not-json",
        _train("reweighting.method=static", "reweighting.options={weights_from: {tmp}/w.txt}"),
        "is not JSON (line 1, column 1",
        _write("w.txt", "weights: 1, 2\n"),
    ),
    Row(
        "paths/weights-from-not-a-result",
        _train("reweighting.method=static", "reweighting.options={weights_from: {tmp}/r.json}"),
        "is it a mixsel result.json",
        _write("r.json", '{"domains": ["a"], "final_weights": [1, 2]}'),
    ),
    Row(
        "paths/model-pickled-weights",
        _train("model.name_or_path={tmp}/pick", "model.tokenizer=embedded"),
        "pickled Python objects",
        _pickled_weights,
    ),
    Row(
        "paths/model-custom-code",
        _train("model.name_or_path={tmp}/custom", "model.tokenizer=embedded"),
        "model.name_or_path='",
        _custom_code,
    ),
    Row(
        "paths/tokenizer-custom-code",
        _train("model.tokenizer={tmp}/tok"),
        "model.trust_remote_code=true",
        _custom_tokenizer,
    ),
    Row(
        "paths/reference-custom-code",
        _train("reweighting.method=doremi", "reweighting.reference_model={tmp}/custom"),
        "reweighting.reference_model='",
        _custom_code,
    ),
    Row(
        "paths/relative-to-config-file",
        ("train", "-q", "--config", "{tmp}/cfg/c.yaml", *FAST, OUT),
        "cfg/data.jsonl",  # data.jsonl is in the working directory, not next to the config file
        _both(_write("data.jsonl", DATA), _write("cfg/c.yaml", "data:\n  source: data.jsonl\n")),
    ),
    # ---- the run folder -----------------------------------------------------------------------------------------
    Row("output-folder/is-a-file", _train("train.output_dir={tmp}/f"), "is a file", _write("f", "x")),
    Row("output-folder/under-a-file", _train("train.output_dir={tmp}/f/run"), "lies under", _write("f", "x")),
    Row("output-folder/too-long", _train("train.output_dir={tmp}/" + "x" * 300), "too long"),
    Row("output-folder/not-writable", _train("train.output_dir=/proc/mixsel-run"), "not writable"),
    Row("output-folder/holds-a-run", _train("train.output_dir={tmp}/run"), "already holds a run"),
    Row(
        "output-folder/foreign-files",
        (*_train("train.output_dir={tmp}/mine"), "--overwrite"),
        "not a mixsel run's",
        _write("mine/notes.txt", "mine"),
    ),
    Row(
        "output-folder/cwd-with-user-config",
        (*_train("train.output_dir=."), "--overwrite"),
        "is not a mixsel run (no .mixsel-run.json",
        _write("config.yaml", "mine: true\n"),
    ),
    Row("output-folder/resume-and-overwrite", (*_train(), "--resume", "--overwrite"), "--overwrite"),
    Row("output-folder/force-without-resume", (*_train(), "--force-resume"), "--force-resume"),
    # ---- resuming ------------------------------------------------------------------------------------------------
    Row(
        "resume/empty-folder", (*_train("train.output_dir={tmp}/e"), "--resume"), "no checkpoint", _write("e/.keep", "")
    ),
    Row("resume/no-folder", (*_train("train.output_dir={tmp}/nope"), "--resume"), "no checkpoint"),
    Row("resume/no-checkpoint-left", _resume(), "no checkpoint", _drop_checkpoints),
    Row("resume/changed-seed", _resume("seed=1"), "seed 0 -> 1"),
    Row("resume/changed-lr", _resume("train.lr=1e-3"), "train.lr"),
    Row("resume/changed-selector", _resume("selection.method=stratified"), "selection.method"),
    Row("resume/changed-reweighter", _resume("reweighting.method=dograph"), "reweighting.method"),
    Row("resume/changed-data", _resume("data.max_length=40"), "data.max_length"),
    Row("resume/steps-below-checkpoint", _resume("train.max_steps=1"), "train.max_steps"),
    Row("resume/every-checkpoint-corrupt", _resume(), "no intact checkpoint", _corrupt_both),
    Row("resume/no-fingerprint", _resume(), "fingerprint", _no_fingerprint),
    # ---- data files (read before the model is built) ---------------------------------------------------------
    Row(
        "data/not-utf8",
        _train("data.source={tmp}/d.jsonl"),
        "not UTF-8",
        _write("d.jsonl", b'{"domain": "a", "text": "caf\xe9"}\n'),
    ),
    Row("data/truncated-gz", _train("data.source={tmp}/data.jsonl.gz"), "truncated or damaged gzip", _gz_truncated),
    Row(
        "data/bad-json-line",
        _train("data.source={tmp}/d.jsonl"),
        "d.jsonl:2",
        _write("d.jsonl", '{"domain": "a", "text": "x"}\n{oops\n'),
    ),
    Row("data/empty-file", _train("data.source={tmp}/d.jsonl"), "no rows", _write("d.jsonl", "")),
    Row(
        "data/no-domain-column",
        _train("data.source={tmp}/d.jsonl"),
        "data.domain_column",
        _write("d.jsonl", '{"text": "x"}\n'),
    ),
    Row("data/folder-without-files", _train("data.source={tmp}/dd"), "holds no", _write("dd/readme.txt", "x")),
    Row(
        "data/too-few-rows",
        _train("data.source={tmp}/d.jsonl", "data.val_per_domain=20"),
        "data.val_per_domain",
        _write("d.jsonl", DATA),
    ),
    # ---- mixsel select ---------------------------------------------------------------------------------------
    Row("select/missing-file", SELECT, "--features"),
    Row("select/empty-file", SELECT, "is empty", _write("feats.pt", b"")),
    Row("select/text-file", SELECT, "not a readable torch.save file", _write("feats.pt", "domains,loss\n0,1\n")),
    Row("select/truncated", SELECT, "not a readable torch.save file", _truncated_features),
    Row("select/code-in-file", SELECT, "weights_only=True", _evil),
    Row("select/not-a-dict", SELECT, "'domains'", lambda t: torch.save([1, 2], t / "feats.pt")),
    Row(
        "select/length-mismatch",
        SELECT,
        "feature 'loss'",
        _features(domains=torch.tensor([0, 1, 0]), loss=torch.rand(5)),
    ),
    Row(
        "select/domain-id-too-large",
        SELECT,
        "num_domains=2",
        _features(domains=torch.tensor([0, 1, 5]), loss=torch.rand(3), num_domains=2),
    ),
    Row(
        "select/domain-id-negative",
        SELECT,
        "Pool.domains",
        _features(domains=torch.tensor([0, -1, 1]), loss=torch.rand(3)),
    ),
    Row("select/float-domains", SELECT, "'domains'", _features(domains=torch.tensor([0.0, 1.0]), loss=torch.rand(2))),
    Row("select/k-not-integer", _sel("big_loss", "1.5"), "--k", _features(**GOOD)),
    Row("select/k-too-large", _sel("big_loss", "9"), "k=9", _features(**GOOD)),
    Row("select/k-zero", _sel("big_loss", "0"), "k must be positive", _features(**GOOD)),
    Row("select/missing-feature", _sel("craig", "2"), "needs features", _features(**GOOD)),
    Row("select/unknown-method", _sel("nope", "2"), "unknown selector", _features(**GOOD)),
    Row("select/option-without-equals", (*SELECT, "--option", "per_domain_budgets"), "--option", _features(**GOOD)),
    Row("select/shares-without-fixed", _sel("partitionsel", "2", "shares=[1, 1]"), "budget=fixed", _features(**GOOD)),
    # ---- compare files ---------------------------------------------------------------------------------------
    _compare("compare/runs-as-list", _cmp(["selection.method=random"]), "'runs'"),
    _compare("compare/overrides-as-string", _cmp({"random": "selection.method=random"}), "runs.random"),
    _compare("compare/unknown-key", _cmp({"random": []}, step=3), "unknown compare keys"),
    _compare("compare/seeds-int", _cmp({"random": []}, seeds=0), "seeds"),
    _compare("compare/base-missing", _cmp({"random": []}, base="nope.yaml"), "base"),
    _compare("compare/yaml-syntax", "runs:\n  random: [a\n", "cmp.yaml:"),
    _compare(
        "compare/forward-reference",
        _cmp({"doremi": ["reweighting.method=doremi", "reweighting.reference_model={run:random}/final"], "random": []}),
        "listed before",
    ),
    _compare(
        "compare/bad-second-run", _cmp({"random": [], "bad": ["selection.method=nope"]}), "unknown selector 'nope'"
    ),
    _compare("compare/bad-value-in-run", _cmp({"random": ["train.lr=-1"]}), "train.lr"),
    Row(
        "compare/output-dir-is-file",
        ("compare", "-q", "--config", "{tmp}/cmp.yaml"),
        "output_dir",
        _both(_write("out", "x"), _write("cmp.yaml", json.dumps(_cmp({"random": []})))),
    ),
    Row("compare/config-missing", ("compare", "-q", "--config", "{tmp}/nope.yaml"), "nope.yaml"),
    _compare("compare/duplicate-run", "runs:\n  random: []\n  random: [seed=1]\n", "cmp.yaml:3:3: duplicate key"),
    _compare("compare/run-named-summary-json", _cmp({"summary.json": []}), "'summary.json' clashes"),
    _compare("compare/run-named-plots", _cmp({"random": [], "Plots": []}), "'Plots' clashes"),
    _compare(
        "compare/checker-of-second-run",
        _cmp({"random": [], "bad": ["eval.answer_checker=_checkers:one_argument"]}),
        "eval.answer_checker='_checkers:one_argument'",
    ),
    # ---- faults during training: a clear line, and the last good checkpoint untouched ----------------------------
    Row(
        "fault/divergence-lr",
        _resume("train.max_steps=8", "train.lr=1e6", "train.save_every=1", "--force-resume"),
        "diverged",
        keep=CHECKPOINTS,
    ),
    Row("fault/divergence-fresh", _train("train.lr=100.0", "train.warmup_steps=0"), "diverged", keep=()),
    Row("fault/nan-loss", _resume("train.save_every=1"), "non-finite loss", patch=_nan_loss, keep=CHECKPOINTS),
    Row(
        "fault/disk-full", _resume("train.save_every=1"), "no space left on device", patch=_disk_full, keep=CHECKPOINTS
    ),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A micro run stopped after step 2 of 4, with checkpoints at steps 1 and 2 (no result.json)."""
    from mixsel.config import load_config
    from mixsel.train import train

    out = tmp_path_factory.mktemp("hardening") / "run"
    cfg = load_config(None, [*FAST, "eval.exact_match=0", "train.max_steps=4", f"train.output_dir={out}"])
    cfg.train.save_every, cfg.train.stop_after = 1, 2
    assert train(cfg, progress=False) == {"stopped_at": 2}
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the SHA-256 of its bytes (``"dir"`` for folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _kept(snapshot: dict[str, str], keep: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in snapshot.items() if any(k == p or k.startswith(p + "/") for p in keep)}


def _prepare(row: Row, tmp: Path, request: Any) -> list[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in row.args]
    if any(str(tmp / "run") in a for a in argv):
        shutil.copytree(request.getfixturevalue("trained_run"), tmp / "run")
    if row.setup is not None:
        row.setup(tmp)
    return argv


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_one_line_exit_2_nothing_changed(row, tmp_path, monkeypatch, capsys, request):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MIXSEL_DEBUG", raising=False)
    if row.id == "config-range/device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if row.id == "output-folder/not-writable" and not os.path.isdir("/proc"):
        pytest.skip("no read-only /proc here")
    argv = _prepare(row, tmp_path, request)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    if row.patch is not None:
        row.patch(monkeypatch)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("mixsel") and "error: " in lines[0], lines
    assert row.expect in lines[0], lines[0]
    assert "Traceback" not in lines[0]
    after = _snapshot(tmp_path)
    if row.keep is None:
        assert after == before, "files were written or changed"
    else:
        assert _kept(after, row.keep) == _kept(before, row.keep), "the last good checkpoint changed"
    assert not (tmp_path / "pwned").exists()


def test_the_table_covers_every_class():
    """At least 60 rows, over every class of bad input named in the issue."""
    classes = Counter(row.id.split("/")[0] for row in ROWS)
    assert sum(classes.values()) >= 60
    assert set(classes) >= {
        "config-file", "config-value", "config-range", "methods", "paths", "output-folder", "resume", "data",
        "select", "compare", "fault", "start",
    }  # fmt: skip
    assert len({row.id for row in ROWS}) == len(ROWS)


# ---- the Python API: a ValueError (or KeyError for names) that names the argument ----------------------------------


def _pool(**kw: Any) -> Any:
    from mixsel.selection import Pool

    return Pool(**{"domains": torch.tensor([0, 1, 0, 1]), "num_domains": 2, **kw})


def _select(name: str, k: Any, **options: Any) -> Any:
    from mixsel import get_selector

    selector = get_selector(name, **options)
    feats = {"loss": torch.rand(4), "perplexity": torch.rand(4) + 1, "confidence": torch.rand(4)}
    return selector.select(_pool(features={f: feats[f] for f in selector.requires if f in feats}), k)


API_ROWS: list[tuple[str, Callable[[], Any], str]] = [
    ("pool/float-domains", lambda: _pool(domains=torch.tensor([0.0, 1.0])), "Pool.domains"),
    ("pool/2d-domains", lambda: _pool(domains=torch.zeros(2, 2, dtype=torch.long)), "Pool.domains"),
    ("pool/ids-out-of-range", lambda: _pool(domains=torch.tensor([0, 3])), "num_domains=2"),
    ("pool/negative-ids", lambda: _pool(domains=torch.tensor([0, -1])), "Pool.domains"),
    ("pool/num-domains-zero", lambda: _pool(num_domains=0), "Pool.num_domains"),
    ("pool/feature-rows", lambda: _pool(features={"loss": torch.rand(3)}), "feature 'loss'"),
    ("pool/gram-not-square", lambda: _pool(features={"gram": torch.rand(4, 3)}), "feature 'gram'"),
    ("pool/domain-weights-length", lambda: _pool(domain_weights=torch.rand(3)), "Pool.domain_weights"),
    ("selector/unknown-name", lambda: _select("nope", 2), "unknown selector"),
    ("selector/k-fraction", lambda: _select("big_loss", 2.5), "k must be a positive integer"),
    ("selector/k-string", lambda: _select("big_loss", "2"), "k must be a positive integer"),
    ("selector/k-zero", lambda: _select("random", 0), "k must be positive"),
    ("selector/shares-without-fixed", lambda: _select("partitionsel", 2, shares=[1, 1]), "budget=fixed"),
    ("selector/shares-negative", lambda: _select("partitionsel", 2, budget="fixed", shares=[-1, 1]), "shares"),
    ("selector/shares-nan", lambda: _select("partitionsel", 2, budget="fixed", shares=[float("nan"), 1]), "shares"),
]


@pytest.mark.parametrize(("row", "call", "expect"), API_ROWS, ids=[r[0] for r in API_ROWS])
def test_python_api_bad_input_names_the_argument(row, call, expect):
    with pytest.raises((ValueError, KeyError)) as info:
        call()
    assert expect in str(info.value)


# ---- real processes: no log line, warning or traceback reaches stderr ------------------------------------------------


PROCESS_ROWS = [
    ("process/model-typo", _train("model.name_or_path=modls/typo"), "hub is offline", None),
    ("process/data-not-utf8", _train("data.source={tmp}/d.jsonl"), "not UTF-8", _write("d.jsonl", b"\xff\xfe")),
    ("process/resume-changed", _resume("train.lr=1e-3"), "train.lr", None),
]


@pytest.mark.parametrize(("row", "args", "expect", "setup"), PROCESS_ROWS, ids=[r[0] for r in PROCESS_ROWS])
def test_bad_input_in_a_real_process(row, args, expect, setup, tmp_path, request):
    argv = _prepare(Row(row, args, expect, setup), tmp_path, request)
    before = _snapshot(tmp_path)
    src = str(Path(mixsel.__file__).parents[1])  # this checkout's code, whatever the working directory
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("MIXSEL_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mixsel", *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("mixsel: error: ") and expect in lines[0], proc.stderr
    assert proc.stdout == ""
    assert _snapshot(tmp_path) == before
