"""Nested dataclass configs, loaded from YAML with strict keys and ``a.b=c`` overrides.

Example::

    cfg = load_config("configs/default.yaml", ["train.max_steps=20", "selection.method=stratified"])
    save_config(cfg, "runs/x/config.yaml")

Unknown keys are errors (with the valid keys listed), values are parsed as YAML scalars and checked
against the field's type, and the resolved config is saved next to every run.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    "config_to_dict",
    "describe_config",
    "field_help",
    "from_dict",
    "load_config",
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

    # optimizer steps
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
    # continue from the run folder's last checkpoint
    resume: bool = False
    # stop (with a checkpoint) after this many steps, keeping the schedule of max_steps
    stop_after: int | None = None
    # write every step's selected example ids to selections.jsonl
    log_selections: bool = False
    # auto (CUDA when available) | cpu | cuda | cuda:N
    device: str = "auto"
    # CPU threads for torch; None = torch's default
    threads: int | None = None
    # under torchrun, who computes selection features: global | gather | local (docs/distributed.md)
    distributed_selection: str = "global"
    # forward passes under torch.autocast: bf16 | None
    autocast: str | None = None


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


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Check (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{path}: {value!r} does not match {tp} ({'; '.join(errors)})")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {value!r}")
        return [_check_value(f"{path}[]", args[0] if args else Any, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{path}: expected a string, got {value!r}")
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
        raise KeyError(f"unknown config key(s) {unknown} at {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise TypeError(f"{path}{f.name}: expected a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[f.name] = from_dict(tp, value, f"{path}{f.name}.")
        else:
            kwargs[f.name] = _check_value(f"{path}{f.name}", tp, value)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = {}
            node[key] = nxt
        if not isinstance(nxt, dict):
            raise KeyError(f"override {dotted!r}: {key!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=20)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        _set_path(tree, key, yaml.safe_load(raw) if raw.strip() else None)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML (or defaults) and apply overrides.

    ``path`` may be a YAML file, or ``None`` for the dataclass defaults (the embedded default experiment).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} not found; pass --config with an existing YAML file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    tree = apply_overrides(tree, list(overrides or []))
    return validate(from_dict(ExperimentConfig, tree))


# (dotted field, smallest allowed value, what the field means): checked by ``validate``
_MINIMA: tuple[tuple[str, float, str], ...] = (
    ("train.max_steps", 1, "the number of optimizer steps"),
    ("train.batch_size", 1, "examples trained on per step"),
    ("train.pool_size", 1, "candidates drawn per step"),
    ("train.micro_batch_size", 1, "examples per forward/backward"),
    ("train.warmup_steps", 0, "learning-rate warm-up steps"),
    ("train.log_every", 1, "steps between metric rows"),
    ("train.save_every", 0, "steps between checkpoints (0 = only the final one)"),
    ("train.weight_decay", 0, "AdamW weight decay"),
    ("eval.every", 1, "steps between evaluations (the last step is always evaluated)"),
    ("eval.max_per_domain", 1, "validation examples per domain"),
    ("eval.exact_match", 0, "exact-match prompts per scored domain (0 = off)"),
    ("eval.max_new_tokens", 1, "generated tokens per exact-match prompt"),
    ("reweighting.update_every", 1, "steps between reweighting updates"),
    ("reweighting.projection_dim", 1, "dimension of the projected domain gradients"),
    ("selection.features.val_anchors", 0, "validation anchors drawn per step as the selection target"),
    ("selection.features.blocks", 0, "transformer blocks of source=blocks, counted from the last (0 = all)"),
)

# (dotted field, allowed values): checked by ``validate``
_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("selection.features.source", ("auto", "blocks", "lm_head", "linear")),
    ("selection.features.anchor_sampling", ("uniform", "balanced")),
    ("selection.features.zo_direction", ("fixed", "per_step")),
)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check value ranges that the types cannot express; return ``cfg`` unchanged.

    Raises:
        ValueError: naming the field, its value and the allowed range.
    """
    for dotted, low, meaning in _MINIMA:
        node: Any = cfg
        for key in dotted.split("."):
            node = getattr(node, key)
        if node < low:
            raise ValueError(f"{dotted}={node} is {meaning} and must be >= {low}: set {dotted}=<a value >= {low}>")
    for dotted, allowed in _CHOICES:
        node = cfg
        for key in dotted.split("."):
            node = getattr(node, key)
        if node not in allowed:
            raise ValueError(f"{dotted}={node!r} is not one of {', '.join(allowed)}: set {dotted}=<one of them>")
    if not cfg.train.lr > 0:
        raise ValueError(f"train.lr={cfg.train.lr} must be > 0 (e.g. train.lr=3e-4)")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio={cfg.train.min_lr_ratio} must lie in [0, 1]")
    if cfg.reweighting.grad_rows not in ("trained", "pool"):
        raise ValueError(f"reweighting.grad_rows={cfg.reweighting.grad_rows!r} must be 'trained' or 'pool'")
    if cfg.train.batch_size > cfg.train.pool_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} exceeds train.pool_size={cfg.train.pool_size}: the batch is "
            "selected from the pool, so set train.pool_size >= train.batch_size"
        )
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
