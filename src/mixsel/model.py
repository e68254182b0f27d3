"""Building the causal LM and its tokenizer from a :class:`mixsel.config.ModelConfig`.

Three ways to get a model, all through ``transformers``:

* ``model.config_file``: a fresh, randomly initialised model from a JSON of config fields (the default
  ``embedded:tiny-llama`` is a ~4M-parameter ``LlamaForCausalLM`` shipped with mixsel);
* ``model.name_or_path``: a local checkpoint folder (e.g. a previous mixsel run's ``final/``) or a
  hub id (users with a hub; nothing here downloads in tests);
* either, wrapped by ``peft`` LoRA when ``model.lora.enabled``.

Every load passes ``trust_remote_code`` explicitly (``model.trust_remote_code``, default false), so
transformers never stops a run to ask "run the custom code? [y/N]": a folder that needs its own code
(``auto_map`` for a class transformers lacks) is refused at start in one line. Weights are read as
tensors only (safetensors, or ``torch.load(weights_only=True)``): a pickled ``.bin`` holding other
objects is one line too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from mixsel.config import ModelConfig
from mixsel.errors import ConfigError

__all__ = [
    "build_model",
    "build_tokenizer",
    "check_model_source",
    "quiet_hf_progress",
    "resolve_config_file",
    "unwrap_model",
]

log = logging.getLogger(__name__)

_PACKAGE_CONFIGS = Path(__file__).parent / "configs"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# files that make a folder a tokenizer / a model checkpoint (full weights or a peft adapter)
_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt"})
_MODEL_FILES = frozenset({"config.json", "adapter_config.json"})


@contextlib.contextmanager
def quiet_hf_progress() -> Any:
    """Silence transformers' own progress bars (e.g. "Writing model shards") for a block."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is needed to build the model anyway
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _hub_offline() -> bool:
    """Whether ``huggingface_hub`` may not download (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].strip() if text else type(err).__name__


def _custom_code_line(value: str, field: str, where: str) -> str:
    """The one line refusing a folder whose ``where`` asks transformers to run the folder's own code."""
    return (
        f"{field}={value!r} ships its own Python code ({where}), which mixsel does not run unless "
        "model.trust_remote_code=true: set that only for a folder you trust, or use a model transformers knows"
    )


def _needs_custom_code(path: Path, need: str) -> str | None:
    """Where a local folder asks for its own code that transformers cannot do without, else ``None``.

    A ``config.json`` with ``auto_map`` whose ``model_type`` transformers does not know (with a known
    one transformers loads its own class and ignores the folder's code), or a ``tokenizer_config.json``
    whose ``auto_map`` names an ``AutoTokenizer`` and whose ``tokenizer_class`` transformers lacks.
    """
    name = "tokenizer_config.json" if need == "tokenizer" else "config.json"
    try:
        fields = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # no such file, or unreadable: transformers says so when it loads the folder
    if not isinstance(fields, dict) or not isinstance(fields.get("auto_map"), dict):
        return None
    if need == "tokenizer":
        import transformers

        wanted = "AutoTokenizer" in fields["auto_map"]
        known = isinstance(fields.get("tokenizer_class"), str) and hasattr(transformers, fields["tokenizer_class"])
    else:
        from transformers import CONFIG_MAPPING

        wanted, known = True, fields.get("model_type") in CONFIG_MAPPING
    return f"auto_map in {name}" if wanted and not known else None


def check_model_source(value: str, field: str, need: str = "model", *, trust_remote_code: bool = False) -> None:
    """Raise one clear line if ``value`` (config field ``field``) cannot give a ``need`` (model or tokenizer).

    A local folder must hold the files of a ``need`` and, unless ``trust_remote_code``, must not need
    its own Python code (``auto_map`` for a class transformers lacks); a value that is not a local
    folder must be a hub id, and the hub must be online. Checked before any data or weights are loaded.

    Raises:
        FileNotFoundError: a folder without the files, or not a folder while the hub is offline.
        ValueError: ``value`` is a file, or a folder that needs its own code.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        files = {p.name for p in path.iterdir()}
        wanted = _TOKENIZER_FILES if need == "tokenizer" else _MODEL_FILES
        if not files & wanted:
            raise FileNotFoundError(
                f"{field}={value!r} is a folder without a {need} (none of {sorted(wanted)}): point it at a saved "
                "model folder such as <run>/final"
            )
        custom = None if trust_remote_code else _needs_custom_code(path, need)
        if custom is not None:
            raise ConfigError(_custom_code_line(value, field, custom))
        return
    if path.exists():
        raise ConfigError(f"{field}={value!r} is a file; point it at a model folder (with config.json) or a hub id")
    if _hub_offline():
        raise FileNotFoundError(
            f"{field}={value!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1): check the path "
            "(relative paths in a config file resolve against its folder), or unset HF_HUB_OFFLINE to download it"
        )
    from mixsel.config import looks_like_path

    if looks_like_path(value):
        raise FileNotFoundError(
            f"{field}={value!r} is not a local folder (nor a hub id): check the path (relative paths in a config "
            "file resolve against its folder)"
        )


def resolve_config_file(spec: str) -> Path:
    """``embedded:NAME`` -> the packaged ``configs/NAME.json``; anything else is a path."""
    if spec.startswith("embedded:"):
        path = _PACKAGE_CONFIGS / f"{spec.split(':', 1)[1]}.json"
        if not path.exists():
            known = sorted(p.stem for p in _PACKAGE_CONFIGS.glob("*.json"))
            raise FileNotFoundError(
                f"model.config_file={spec!r} is not a packaged model config; use one of "
                f"{', '.join('embedded:' + k for k in known)} or a JSON file"
            )
        return path
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model.config_file={spec!r} does not exist; point it at a JSON of model config fields")
    if not path.is_file():
        raise ConfigError(f"model.config_file={spec!r} is a folder; point it at a JSON file of model config fields")
    return path


def _read_config_file(spec: str) -> dict[str, Any]:
    path = resolve_config_file(spec)
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.config_file={spec!r} is not a JSON file ({_first_line(err)}); fix it") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"model.config_file={spec!r} must hold a JSON object of transformers config fields")
    return fields


def _load_error(source: str, field: str, need: str, err: BaseException) -> ConfigError:
    """The one line for a model or tokenizer that transformers could not load from ``source``."""
    text = " ".join(str(err).split())
    if "contains custom code" in text:  # transformers' refusal under trust_remote_code=False
        return ConfigError(_custom_code_line(source, field, "auto_map"))
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met a pickled object
        return ConfigError(
            f"{field}={source!r}: its .bin weights hold pickled Python objects besides tensors, which mixsel "
            "never unpickles (torch.load weights_only=True); save the weights as safetensors "
            "(model.save_pretrained writes model.safetensors) from a source you trust"
        )
    return ConfigError(f"{field}={source!r}: no {need} could be loaded from it ({_first_line(err)})")


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer: ``cfg.tokenizer`` if given, else the checkpoint's, else the embedded BPE."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if source is None or source == "embedded":
        from mixsel.data.embedded import load_embedded_tokenizer

        return load_embedded_tokenizer()
    field = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    check_model_source(source, field, "tokenizer", trust_remote_code=cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(source, field, "tokenizer", err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    cfg: ModelConfig, tokenizer: Any | None = None, *, field: str = "model.name_or_path"
) -> torch.nn.Module:
    """Build (or load) the causal LM described by ``cfg``; apply LoRA if enabled.

    ``field`` names the config field ``cfg.name_or_path`` came from, for error messages.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is not one of {sorted(_DTYPES)}")
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kwargs["trust_remote_code"] = cfg.trust_remote_code  # always explicit: transformers never asks [y/N]
    if cfg.name_or_path:
        check_model_source(cfg.name_or_path, field, "model", trust_remote_code=cfg.trust_remote_code)
        try:
            with quiet_hf_progress():  # transformers' own "Loading weights" bar
                model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **kwargs)
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise _load_error(cfg.name_or_path, field, "model", err) from None
        log.info("loaded model from %s", cfg.name_or_path)
    elif cfg.config_file:
        fields = _read_config_file(cfg.config_file)
        model_type = fields.pop("model_type", "llama")
        if tokenizer is not None:
            fields.setdefault("vocab_size", len(tokenizer))
            fields.setdefault("pad_token_id", tokenizer.pad_token_id)
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields.setdefault("bos_token_id", tokenizer.bos_token_id or tokenizer.eos_token_id)
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except Exception as err:  # ValueError, TypeError, or huggingface_hub's StrictDataclass*ValidationError
            if not isinstance(err, (TypeError, ValueError)) and not type(err).__name__.startswith("StrictDataclass"):
                raise
            why = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(
                f"model.config_file={cfg.config_file!r}: transformers rejects its fields "
                f"({why[:300] + '...' if len(why) > 300 else why}); fix them"
            ) from None
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        log.info("built a fresh %s from %s", type(model).__name__, cfg.config_file)
    else:
        raise ConfigError("set model.name_or_path (a checkpoint) or model.config_file (a fresh model)")
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/FSDP/compile wrappers (not peft: features need the adapters)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner
