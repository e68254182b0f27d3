"""Nested dataclass configs, loaded from YAML with strict keys and ``a.b=c`` overrides.

Example::

    cfg = load_config("configs/default.yaml", ["train.max_steps=20", "selection.method=stratified"])
    save_config(cfg, "runs/x/config.yaml")

Unknown keys are errors (with the valid keys listed), values are parsed as YAML scalars and checked
against the field's type, and the resolved config is saved next to every run.

Numbers: YAML 1.1 (PyYAML's default) reads ``3e-4`` and ``1e6`` as strings; mixsel's loader reads them
as floats, as YAML 1.2 does, in config files, overrides and compare files alike. A key written twice
in one mapping is an error naming file:line (PyYAML would keep the last one silently).

Paths: a relative path written in a config file (``data.source``, ``model.name_or_path``,
``model.tokenizer``, ``model.config_file``, ``reweighting.reference_model``,
``reweighting.options.weights_from``, ``train.output_dir``) resolves against that file's folder; a
relative path given as a command-line override resolves against the working directory. The saved
``config.yaml`` holds absolute paths, so it reloads from anywhere. ``model.*`` and
``reweighting.reference_model`` values that look like hub ids (``org/name``, not an existing folder)
are kept as given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixsel.errors import ConfigError, OptionError, UnknownNameError

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FeatureConfig",
    "ModelConfig",
    "ModelLoraConfig",
    "ReweightingConfig",
    "SelectionConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "config_fingerprint",
    "config_to_dict",
    "describe_config",
    "describe_diff",
    "field_help",
    "from_dict",
    "load_config",
    "parse_yaml",
    "read_yaml",
    "resolve_override",
    "run_fields",
    "save_config",
    "validate",
]


@dataclass
class DataConfig:
    """Where the multi-domain data comes from and how it is tokenised.

    ``source="embedded"`` uses the corpus shipped with mixsel. Otherwise ``source`` is a path (JSONL,
    Parquet, CSV, a folder of them, or a ``datasets.save_to_disk`` folder) or, with ``format="hf"``,
    a Hugging Face hub dataset name.
    """

    # "embedded" (the shipped corpus), a file or folder path, or a hub dataset name with format=hf
    source: str = "embedded"
    # jsonl | json | parquet | csv | hf; None = guessed from the path
    format: str | None = None
    # column holding each row's domain (names or integer ids)
    domain_column: str = "domain"
    # column of plain-text rows (every token is a training target)
    text_column: str = "text"
    # column of the prompt in prompt/response rows (its tokens are masked from the loss)
    prompt_column: str | None = None
    # column of the response in prompt/response rows (the training targets)
    response_column: str | None = None
    # column of the checkable final answer (scored by exact match); None = parsed from the response
    answer_column: str | None = None
    # column with fixed train/val/test assignments; None = split per domain by the seed
    split_column: str | None = None
    # hub dataset configuration name (format=hf)
    hf_config: str | None = None
    # hub dataset split to load (format=hf)
    hf_split: str | None = None
    # keep only these domains, in this id order; None = every domain found, sorted
    domains: list[str] | None = None
    # tokens per example after truncation
    max_length: int = 128
    # validation rows held out per domain (when split_column is None)
    val_per_domain: int = 32
    # test rows held out per domain (when split_column is None)
    test_per_domain: int = 32
    # cap on training rows per domain; None = all
    max_train_per_domain: int | None = None
    # column of conversations (lists of {role, content} turns); None: a column named "messages", if any
    messages_column: str | None = None
    # instruction rows over max_length: "left" cuts the prompt's start, "drop" drops them, "right" cuts the response
    truncation: str = "left"
    # joins prompt and response (and a conversation's turns) when no chat template is used
    separator: str = "\n"
    # write prompt/response and conversation rows with the tokenizer's chat template, when it has one
    chat_template: bool = True
    # keep the prepared (tokenised, memory-mapped) corpus on disk and reuse it in later runs; false =
    # prepare into a temporary folder removed when the process ends
    cache: bool = True
    # where prepared corpora live; None = $MIXSEL_CACHE, else the `datasets` cache folder
    # ($HF_DATASETS_CACHE, or $HF_HOME / $XDG_CACHE_HOME based) + "/mixsel"
    cache_dir: str | None = None
    # processes that tokenise while preparing (datasets.map num_proc); None = the CPU cores available
    prepare_workers: int | None = None
    # read the source as a stream (a hub dataset, files larger than the disk): no prepared store; needs data.domains
    streaming: bool = False
    # streaming: tokenised training rows buffered per domain (pools are drawn from the buffers)
    stream_buffer: int = 1024

    def column_options(self) -> dict[str, str | None]:
        """The column mapping as the keyword arguments of :func:`mixsel.data.loading.load_records`."""
        return {
            "domain_column": self.domain_column,
            "text_column": self.text_column,
            "prompt_column": self.prompt_column,
            "response_column": self.response_column,
            "messages_column": self.messages_column,
            "answer_column": self.answer_column,
            "split_column": self.split_column,
        }


@dataclass
class ModelLoraConfig:
    """LoRA adapters (peft) on the model's linear layers; the base weights stay frozen."""

    # train LoRA adapters instead of every weight
    enabled: bool = False
    # adapter rank
    r: int = 8
    # LoRA alpha (the update is scaled by alpha / r)
    alpha: int = 16
    # dropout on the adapter input
    dropout: float = 0.0
    # module-name suffixes that get adapters
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """The causal LM: ``name_or_path`` is a local checkpoint folder or a hub id; ``config_file``
    (a JSON of ``transformers`` config fields, with ``model_type``) builds a fresh model instead."""

    # local checkpoint folder or hub id of a pretrained causal LM; None = build from config_file
    name_or_path: str | None = None
    # transformers config JSON for a freshly initialised model ("embedded:tiny-llama" = the default)
    config_file: str | None = "embedded:tiny-llama"
    # tokenizer folder or hub id; None = the model's, or the embedded BPE for the embedded model
    tokenizer: str | None = None
    # parameter dtype: float32 | bfloat16 | float16
    dtype: str = "float32"
    # attention kernel passed to transformers (sdpa | eager | flash_attention_2)
    attn_implementation: str | None = "sdpa"
    # run the Python code a model or tokenizer folder ships (auto_map in its config.json /
    # tokenizer_config.json); false: such a folder is refused at start unless transformers has the class
    trust_remote_code: bool = False
    # LoRA adapters
    lora: ModelLoraConfig = field(default_factory=ModelLoraConfig)


@dataclass
class FeatureConfig:
    """How per-example gradient features and the validation anchors are computed for gradient-based selectors.

    ``source="auto"`` and ``normalize=None`` take each selector's reference setting
    (``feature_defaults`` on the selector class; docs/methods.md): PartitionSel, per_domain and
    GREATS use the L2-normalised gradients of the last 3 transformer blocks' linear layers (their
    LoRA A/B under peft), as PartitionSel's code; the other gradient selectors use the exact
    LM-head gradients, unnormalised.
    """

    # auto (the selector's reference) | blocks (linear layers / LoRA A,B of the last `blocks` blocks) |
    # lm_head | linear (the `modules` list)
    source: str = "auto"
    # transformer blocks, counted from the last, that source=blocks differentiates (PartitionSel's code: 3); 0 = all
    blocks: int = 3
    # module names for source=linear; None = the last V-projection (its LoRA B under peft)
    modules: list[str] | None = None
    # Kronecker random projection of the gradients to this many coordinates; None = exact
    projection_dim: int | None = None
    # L2-normalise per-example gradients (cosine Gram); None = the selector's reference
    # (true for partitionsel, per_domain, greats as PartitionSel's code; false otherwise)
    normalize: bool | None = None
    # validation anchors drawn per step as the selection target of partitionsel, per_domain, greats
    # (PartitionSel's code: 4)
    val_anchors: int = 4
    # how the anchors are drawn: uniform (over all validation examples, the reference code) |
    # balanced (round-robin over the domains)
    anchor_sampling: str = "uniform"
    # module CoLM's SPSA features perturb; None = the last V-projection (its LoRA B under peft)
    zo_module: str | None = None
    # SPSA perturbation scale epsilon (CoLM: 1e-3)
    zo_eps: float = 1e-3
    # SPSA direction: fixed (one seeded direction for the whole run, CoLM's code) | per_step (a fresh one every step)
    zo_direction: str = "fixed"


@dataclass
class SelectionConfig:
    """Which selector picks each step's batch from the pool, and what it is given."""

    # registered selector name (`mixsel methods`)
    method: str = "random"
    # keyword options of the selector (docs/methods.md lists them per method)
    options: dict[str, Any] = field(default_factory=dict)
    # how gradient features are computed
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # weight each example's loss by the selector's weights (OMP coefficients, cluster sizes);
    # None = the method's reference (craig, gradmatch: true; the others: false)
    use_weights: bool | None = None
    # log gradient conflicts / mismatch every step even when the selector needs no Gram (costs a pass)
    diagnostics: bool = False


@dataclass
class ReweightingConfig:
    """Which reweighter adapts the domain weights, and what it is given."""

    # registered reweighter name (`mixsel methods`)
    method: str = "uniform"
    # keyword options of the reweighter (docs/reweighting.md)
    options: dict[str, Any] = field(default_factory=dict)
    # steps per reweighting update (statistics of the steps in between are accumulated)
    update_every: int = 1
    # checkpoint folder of the reference model (DoReMi), e.g. <run>/final
    reference_model: str | None = None
    # dimension of the projected domain gradients (DoGraph)
    projection_dim: int = 512
    # validation rows per domain for the target gradient (DoGraph)
    val_per_domain: int = 4
    # rows of DoGraph's domain gradients: trained (captured in the train step's own backward, no extra
    # pass) | pool (a separate pass over this rank's share of the pool)
    grad_rows: str = "trained"
    # compute the costly domain statistics (DoReMi's reference losses, DoGraph's domain gradients) only on
    # the last step of each update_every window and update the reweighter from that step's rows alone
    amortize: bool = False


@dataclass
class TrainConfig:
    """The optimisation: steps, batch and pool sizes, schedule, checkpoints, devices."""

    # optimizer steps (0 = only evaluate the starting model, e.g. a pretrained model's base score)
    max_steps: int = 200
    # examples trained on per step (selected from the pool)
    batch_size: int = 16
    # candidates drawn per step (batch_size of them are selected)
    pool_size: int = 64
    # examples per forward/backward (gradient accumulation inside a step)
    micro_batch_size: int = 16
    # peak AdamW learning rate
    lr: float = 3e-3
    # final learning rate as a fraction of lr (cosine decay)
    min_lr_ratio: float = 0.1
    # linear warm-up steps
    warmup_steps: int = 10
    # AdamW weight decay
    weight_decay: float = 0.0
    # gradient-norm clipping threshold; 0 = off
    grad_clip: float = 1.0
    # run folder (config.yaml, metrics.jsonl, result.json, checkpoints, final/)
    output_dir: str = "runs/default"
    # steps between checkpoints; 0 = only the final one
    save_every: int = 0
    # steps between metric rows in metrics.jsonl
    log_every: int = 10
    # continue from the run folder's last checkpoint (refused if a field that alters the run changed)
    resume: bool = False
    # start afresh in a run folder that holds an earlier run, deleting that run's files (never others)
    overwrite: bool = False
    # resume even though fields that alter the run changed since the checkpoint (they are listed)
    force_resume: bool = False
    # stop as diverged when the train loss exceeds this multiple of ln(vocab size) (uniform guessing); null = never
    max_loss_factor: float | None = 3.0
    # stop as diverged when one step multiplies the weight norm by more than this; null = never
    max_weight_growth: float | None = 100.0
    # stop (with a checkpoint) after this many steps, keeping the schedule of max_steps
    stop_after: int | None = None
    # write every step's picks to selections.jsonl: split rows, domains, sources (file:line), selection weights
    log_selections: bool = False
    # auto (CUDA when available) | cpu | cuda | cuda:N
    device: str = "auto"
    # CPU threads for torch; None = physical cores / processes on this machine (OMP_NUM_THREADS wins if set)
    threads: int | None = None
    # under torchrun, who computes selection features: global | gather | local (docs/distributed.md)
    distributed_selection: str = "global"
    # forward passes under torch.autocast: bf16 | None
    autocast: str | None = None
    # metric loggers besides metrics.jsonl (always written): tensorboard | wandb (offline without an API key)
    report_to: list[str] = field(default_factory=list)
    # write single-run plots (loss, per-domain loss, domain weights, selection composition) to <output_dir>/plots
    plots: bool = True


@dataclass
class EvalConfig:
    """Per-domain validation / test loss and exact match."""

    # steps between validation evaluations (the last step is always evaluated)
    every: int = 50
    # validation / test rows per domain in each evaluation
    max_per_domain: int = 32
    # exact-match prompts per scored domain at the final test; 0 = off
    exact_match: int = 32
    # generated tokens per exact-match prompt
    max_new_tokens: int = 96
    # prompts decoded together by exact match (larger batches use a CPU better; decoding stops when all end)
    generation_batch_size: int = 16
    # answer checker: gsm8k, exact, numeric, sympy or package.module:function; or {domain: checker, "*": the rest}
    answer_checker: str | dict[str, str] = "gsm8k"
    # tolerance of the numeric and sympy checkers (relative, and absolute near zero)
    answer_tolerance: float = 1e-6


@dataclass
class ExperimentConfig:
    """One run: data, model, training, selection, reweighting and evaluation."""

    # seed of every random choice (sampling, selection, initialisation, splits)
    seed: int = 0
    # run name, recorded in result.json
    name: str = "default"
    # the data mixture
    data: DataConfig = field(default_factory=DataConfig)
    # the model
    model: ModelConfig = field(default_factory=ModelConfig)
    # the optimisation
    train: TrainConfig = field(default_factory=TrainConfig)
    # the selector
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # the reweighter
    reweighting: ReweightingConfig = field(default_factory=ReweightingConfig)
    # the evaluation
    eval: EvalConfig = field(default_factory=EvalConfig)


def field_help(cls: type) -> dict[str, str]:
    """The one-line comment written above each field of config dataclass ``cls``, by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and match.group(1) in names and comment:
            out[match.group(1)] = " ".join(comment)
        comment = []
    return out


def describe_config(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every config field as ``section.key = value  # what it does`` (the defaults when ``cfg`` is None).

    ``mixsel train --help-config`` prints these lines.
    """
    cfg = ExperimentConfig() if cfg is None else cfg
    helps = field_help(type(cfg))
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"# {prefix}{f.name}: {helps.get(f.name, '')}".rstrip())
            lines.extend(describe_config(value, f"{prefix}{f.name}."))
        else:
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{prefix}{f.name} = {shown}  # {helps.get(f.name, '')}")
    return lines


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Check (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except (TypeError, ValueError):
                continue
        kinds = " or ".join(_KINDS.get(a, "null" if a is type(None) else getattr(a, "__name__", str(a))) for a in args)
        raise OptionError(f"{path}: expected {kinds}, got {value!r}; set {path}=<{kinds}>")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{path}: expected a list, got {value!r}; write {path}=[a, b]")
        return [_check_value(f"{path}[]", args[0] if args else Any, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise OptionError(f"{path}: expected a mapping, got {value!r}; write {path}={{key: value}}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{path}: expected a number, got {value!r} (e.g. {path}=3e-4)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise with the valid ones listed."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path.rstrip(".") or "top level"
        raise UnknownNameError(f"unknown config key(s) {unknown} at {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise OptionError(f"{path}{f.name}: expected a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[f.name] = from_dict(tp, value, f"{path}{f.name}.")
        else:
            kwargs[f.name] = _check_value(f"{path}{f.name}", tp, value)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------------
# reading YAML: floats as YAML 1.2 writes them, and errors that name the file, line and fix
# --------------------------------------------------------------------------------------------------


class _DuplicateKeyError(yaml.MarkedYAMLError):
    """A key written twice in one mapping (PyYAML keeps the last silently)."""

    def __init__(self, key: Any, first: Any, again: Any) -> None:
        super().__init__(problem=f"duplicate key {key!r} (first at line {first.line + 1})", problem_mark=again)
        self.key = key


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``3e-4``, ``1e6`` and ``1.0e2`` as floats (YAML 1.2), and
    refuses a key written twice in one mapping (``<<`` merge keys may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML ``text`` with mixsel's loader; a syntax error names ``source:line:column``.

    Raises:
        ValueError: ``"<source>:<line>:<column>: invalid YAML (<problem>); ..."``, or
            ``"<source>:<line>:<column>: duplicate key 'lr' (first at line <n>); ..."`` for a key written
            twice in one mapping.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except _DuplicateKeyError as err:
        mark = err.problem_mark
        raise ConfigError(
            f"{source}:{mark.line + 1}:{mark.column + 1}: {err.problem}; keep one of them (YAML would silently "
            "use the last)"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        context = err.context or ""
        if err.context_mark is not None and err.context_mark is not mark:
            context += f" at line {err.context_mark.line + 1}"
        problem = "; ".join(part for part in (err.problem, context.strip()) if part)
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax there") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML ({err}); fix the syntax") from None


def read_yaml(path: str | Path, what: str = "config file", flag: str = "--config") -> Any:
    """Read and parse the YAML file ``path``, with one clear line for each way it can be wrong.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, is not UTF-8 (the byte offset is named), or is not valid YAML
            (file:line:column).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found; pass {flag} with an existing YAML file")
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; pass {flag} with a YAML file inside it")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    return parse_yaml(text, str(path))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = {}
            node[key] = nxt
        if not isinstance(nxt, dict):
            raise UnknownNameError(f"override {dotted!r}: {key!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _split_override(item: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", <c parsed as YAML>)``, with one clear line for each malformed form."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=20)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; write section.key=value (e.g. train.max_steps=20)")
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "unreadable value"
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix it") from None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        key, value = _split_override(item)
        _set_path(tree, key, value)
    return tree


# --------------------------------------------------------------------------------------------------
# paths: relative to the config file that wrote them, overrides relative to the working directory
# --------------------------------------------------------------------------------------------------

# config fields holding paths: "file" always resolves; "model" and "data" may name a hub id instead
_PATH_FIELDS: dict[str, str] = {
    "data.source": "data",
    "model.name_or_path": "model",
    "model.tokenizer": "model",
    "model.config_file": "file",
    "reweighting.reference_model": "model",
    "reweighting.options.weights_from": "file",
    "train.output_dir": "file",
    "data.cache_dir": "file",
}
_PATH_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".pq", ".csv", ".yaml", ".yml", ".pt", ".safetensors", ".bin")


def looks_like_path(value: str) -> bool:
    """True for values that cannot be hub ids (``org/name``): ``./x``, ``a/b/c``, ``x.jsonl``, globs."""
    return (
        value.startswith((".", "/", "~"))
        or value.count("/") >= 2
        or "\\" in value
        or value.lower().endswith(_PATH_SUFFIXES)
        or any(ch in value for ch in "*?[")
    )


def _resolve_path(dotted: str, value: Any, base: Path, data_format: str | None) -> Any:
    """``value`` of path field ``dotted`` made absolute against ``base`` (hub ids and embedded kept)."""
    if not isinstance(value, str) or not value.strip() or value == "embedded" or value.startswith("embedded:"):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = os.path.abspath(os.path.join(base, expanded))
    kind = _PATH_FIELDS[dotted]
    if kind == "file" or (kind == "data" and data_format not in ("hf", "?")):
        return candidate
    return candidate if os.path.exists(candidate) or looks_like_path(value) else value


def _resolve_tree(tree: Any, base: Path, data_format: str | None) -> None:
    """Resolve the path fields present in the nested mapping ``tree`` in place (see the module docstring)."""
    for dotted in _PATH_FIELDS:
        *parents, last = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = _resolve_path(dotted, node[last], base, data_format)


def _resolve_fields(cfg: ExperimentConfig, base: Path) -> None:
    """Resolve the still-relative path fields of ``cfg`` (overrides, defaults) against ``base`` in place."""
    for dotted in _PATH_FIELDS:
        *parents, last = dotted.split(".")
        node: Any = cfg
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
        if isinstance(node, dict) and last in node:
            node[last] = _resolve_path(dotted, node[last], base, cfg.data.format)
        elif node is not None and not isinstance(node, dict) and hasattr(node, last):
            setattr(node, last, _resolve_path(dotted, getattr(node, last), base, cfg.data.format))


def resolve_override(item: str, base: str | Path) -> str:
    """The override ``item`` with a relative path value made absolute against ``base``.

    ``mixsel compare`` passes the overrides written in a compare file through this, so that their
    paths resolve against that file's folder (overrides typed on the command line resolve against the
    working directory when the config is loaded).
    """
    key, value = _split_override(item)
    sub: dict[str, Any] = {}
    _set_path(sub, key, value)
    before = json.dumps(sub, sort_keys=True, default=str)
    _resolve_tree(sub, Path(base), "?")
    if json.dumps(sub, sort_keys=True, default=str) == before:
        return item
    node: Any = sub
    for part in key.split("."):
        node = node[part]
    return f"{key}={json.dumps(node)}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML (or defaults) and apply overrides.

    ``path`` may be a YAML file, or ``None`` for the dataclass defaults (the embedded default experiment).
    Relative paths in the file resolve against its folder; those in ``overrides`` (and the defaults)
    against the working directory.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections (data:, train:, ...) at the top level, "
                f"not a {type(loaded).__name__}"
            )
        tree = loaded
        data = tree.get("data")
        _resolve_tree(tree, path.resolve().parent, data.get("format") if isinstance(data, dict) else None)
    tree = apply_overrides(tree, list(overrides or []))
    cfg = from_dict(ExperimentConfig, tree)
    _resolve_fields(cfg, Path.cwd())
    return validate(cfg)


# --------------------------------------------------------------------------------------------------
# range checks
# --------------------------------------------------------------------------------------------------

# (dotted field, smallest allowed value, what the field means): checked by ``validate``
_MINIMA: tuple[tuple[str, float, str], ...] = (
    ("train.max_steps", 0, "the number of optimizer steps (0 = only evaluate the starting model)"),
    ("train.batch_size", 1, "examples trained on per step"),
    ("train.pool_size", 1, "candidates drawn per step"),
    ("train.micro_batch_size", 1, "examples per forward/backward"),
    ("train.warmup_steps", 0, "learning-rate warm-up steps"),
    ("train.log_every", 1, "steps between metric rows"),
    ("train.save_every", 0, "steps between checkpoints (0 = only the final one)"),
    ("train.weight_decay", 0, "AdamW weight decay"),
    ("train.grad_clip", 0, "the gradient-norm clipping threshold (0 = off; a negative value would ascend)"),
    ("train.threads", 1, "CPU threads for torch (null = physical cores / processes)"),
    ("train.stop_after", 1, "the step after which to stop with a checkpoint"),
    ("train.max_loss_factor", 1, "the multiple of ln(vocab size) above which the loss counts as diverged"),
    ("train.max_weight_growth", 1, "the one-step growth of the weight norm that counts as diverged"),
    ("data.max_length", 2, "tokens per example (a prompt token and a target at least)"),
    ("data.val_per_domain", 0, "validation rows held out per domain"),
    ("data.test_per_domain", 0, "test rows held out per domain"),
    ("data.max_train_per_domain", 1, "the cap on training rows per domain (null = all)"),
    ("data.prepare_workers", 1, "processes that tokenise while preparing the data (null = CPU cores)"),
    ("data.stream_buffer", 1, "tokenised training rows buffered per domain when streaming"),
    ("model.lora.r", 1, "the LoRA rank"),
    ("model.lora.alpha", 1, "the LoRA alpha"),
    ("model.lora.dropout", 0, "the LoRA dropout probability"),
    ("eval.every", 1, "steps between evaluations (the last step is always evaluated)"),
    ("eval.max_per_domain", 1, "validation examples per domain"),
    ("eval.exact_match", 0, "exact-match prompts per scored domain (0 = off)"),
    ("eval.max_new_tokens", 1, "generated tokens per exact-match prompt"),
    ("eval.generation_batch_size", 1, "prompts decoded together by exact match"),
    ("reweighting.update_every", 1, "steps between reweighting updates"),
    ("reweighting.projection_dim", 1, "dimension of the projected domain gradients"),
    ("reweighting.val_per_domain", 1, "validation rows per domain for the target gradient"),
    ("selection.features.val_anchors", 0, "validation anchors drawn per step as the selection target"),
    ("selection.features.blocks", 0, "transformer blocks of source=blocks, counted from the last (0 = all)"),
    ("selection.features.projection_dim", 1, "the gradient projection dimension (null = exact)"),
)

# (dotted field, allowed values): checked by ``validate``
_CHOICES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("data.format", (None, "jsonl", "json", "parquet", "csv", "hf")),
    ("model.dtype", ("float32", "bfloat16", "float16", "float64")),
    ("train.autocast", (None, "bf16", "bfloat16", "none", "false")),
    ("train.distributed_selection", ("global", "gather", "local")),
    ("selection.features.source", ("auto", "blocks", "lm_head", "linear")),
    ("selection.features.anchor_sampling", ("uniform", "balanced")),
    ("selection.features.zo_direction", ("fixed", "per_step")),
    ("reweighting.grad_rows", ("trained", "pool")),
)

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _floats(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float-valued field of ``cfg`` as ``(dotted name, value)``."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_floats(value, f"{prefix}{f.name}."))
        elif isinstance(value, float):
            out.append((f"{prefix}{f.name}", value))
    return out


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check value ranges that the types cannot express; return ``cfg`` unchanged.

    Raises:
        ValueError: naming the field, its value and the allowed range.
    """
    for dotted, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{dotted}={value} is not a finite number; set a finite value (e.g. train.lr=3e-4)")
    for dotted, low, meaning in _MINIMA:
        value = _get(cfg, dotted)
        if value is not None and value < low:
            raise ConfigError(f"{dotted}={value} is {meaning} and must be >= {low}: set {dotted}=<a value >= {low}>")
    for dotted, allowed in _CHOICES:
        value = _get(cfg, dotted)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{dotted}={value!r} is not one of {shown}: set {dotted} to one of them")
    if not cfg.train.lr > 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be > 0 (e.g. train.lr=3e-4)")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={cfg.train.min_lr_ratio} must lie in [0, 1]")
    if not cfg.model.lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={cfg.model.lora.dropout} must lie in [0, 1)")
    if not cfg.selection.features.zo_eps > 0:
        raise ConfigError(f"selection.features.zo_eps={cfg.selection.features.zo_eps} must be > 0 (CoLM uses 1e-3)")
    if cfg.train.batch_size > cfg.train.pool_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds train.pool_size={cfg.train.pool_size}: the batch is "
            "selected from the pool, so set train.pool_size >= train.batch_size"
        )
    if not _DEVICE.match(cfg.train.device):
        raise ConfigError(f"train.device={cfg.train.device!r} is not auto, cpu, mps, cuda or cuda:N")
    if not cfg.train.output_dir.strip():
        raise ConfigError("train.output_dir is empty; name a run folder (e.g. train.output_dir=runs/my_run)")
    if cfg.train.resume and cfg.train.overwrite:
        raise ConfigError(
            "train.resume and train.overwrite are both set: --resume continues the run in the folder, "
            "--overwrite replaces it; keep one"
        )
    _check_streaming(cfg.data)
    options = (("selection.options", cfg.selection.options), ("reweighting.options", cfg.reweighting.options))
    for name, section in options:
        bad = [key for key in section if not isinstance(key, str)]
        if bad:
            raise ConfigError(f"{name} has non-string keys {bad}; write {name}={{name: value}}")
    return cfg


def _check_streaming(data: DataConfig) -> None:
    """Refuse what ``data.streaming=true`` cannot do: what needs the whole corpus before training."""
    if not data.streaming:
        return
    if not data.domains:
        raise ConfigError(
            "data.streaming=true needs data.domains=[...]: a stream cannot be scanned for its domains before "
            "training; list the domains to train on, in id order (e.g. data.domains=[code,math])"
        )
    if data.split_column is not None:
        raise ConfigError(
            f"data.streaming=true cannot use data.split_column={data.split_column!r}: its validation and test rows "
            "would have to be gathered from the whole stream first; unset data.split_column (the first "
            "data.val_per_domain, then data.test_per_domain rows of each domain are held out) or set "
            "data.streaming=false"
        )


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (a temporary sibling, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# fingerprints: which fields define a run (resume checks, mixsel compare's reruns)
# --------------------------------------------------------------------------------------------------

# fields a resumed run may change: they do not alter the weights it trains (max_steps only past the checkpoint)
RESUME_SAFE_FIELDS = frozenset(
    {
        "name",
        "train.max_steps",
        "train.stop_after",
        "train.save_every",
        "train.log_every",
        "train.log_selections",
        "train.output_dir",
        "train.resume",
        "train.overwrite",
        "train.force_resume",
        "train.max_loss_factor",
        "train.max_weight_growth",
        "train.threads",
        "data.cache",
        "data.cache_dir",
        "data.prepare_workers",
        "train.device",
        "eval",
    }
)

# fields mixsel compare ignores when it decides whether a finished run's result is still current
RESULT_SAFE_FIELDS = frozenset(
    {
        "train.stop_after",
        "train.save_every",
        "train.log_every",
        "train.log_selections",
        "train.output_dir",
        "train.resume",
        "train.overwrite",
        "train.force_resume",
        "train.max_loss_factor",
        "train.max_weight_growth",
        "train.threads",
        "data.cache",
        "data.cache_dir",
        "data.prepare_workers",
    }
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty mapping adds nothing, so {} and a missing key agree
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_fields(cfg: Any, ignore: frozenset[str] = RESUME_SAFE_FIELDS) -> dict[str, Any]:
    """The fields of ``cfg`` (a config or its dict) that define the run, flattened to dotted names.

    ``ignore`` lists fields (or whole sections) left out: :data:`RESUME_SAFE_FIELDS` for resuming,
    :data:`RESULT_SAFE_FIELDS` for ``mixsel compare``. A dict is read through :func:`from_dict`, so
    fields added since it was written take their defaults.
    """
    tree = config_to_dict(cfg if dataclasses.is_dataclass(cfg) else from_dict(ExperimentConfig, cfg))
    return {
        key: value
        for key, value in _flatten(tree).items()
        if not any(key == skip or key.startswith(skip + ".") for skip in ignore)
    }


def config_fingerprint(cfg: Any, ignore: frozenset[str] = RESUME_SAFE_FIELDS) -> str:
    """A SHA-256 of :func:`run_fields`: equal fingerprints, equal runs."""
    blob = json.dumps(run_fields(cfg, ignore), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` for every field that differs between two :func:`run_fields`."""
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append((key, None if a is missing else a, None if b is missing else b))
    return out


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``"train.lr 0.003 -> 0.001, seed 0 -> 1"`` for :func:`config_diff` output."""
    shown = [f"{key} {a!r} -> {b!r}" for key, a, b in diff[:limit]]
    if len(diff) > limit:
        shown.append(f"and {len(diff) - limit} more")
    return ", ".join(shown)
