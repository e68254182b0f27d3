"""Building the causal LM and its tokenizer from a :class:`mixsel.config.ModelConfig`.

Three ways to get a model, all through ``transformers``:

* ``model.config_file``: a fresh, randomly initialised model from a JSON of config fields (the default
  ``embedded:tiny-llama`` is a ~4M-parameter ``LlamaForCausalLM`` shipped with mixsel);
* ``model.name_or_path``: a local checkpoint folder (e.g. a previous mixsel run's ``final/``) or a
  hub id (users with a hub; nothing here downloads in tests);
* either, wrapped by ``peft`` LoRA when ``model.lora.enabled``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mixsel.config import ModelConfig

__all__ = ["build_model", "build_tokenizer", "resolve_config_file", "unwrap_model"]

log = logging.getLogger(__name__)

_PACKAGE_CONFIGS = Path(__file__).parent / "configs"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_config_file(spec: str) -> Path:
    """``embedded:NAME`` -> the packaged ``configs/NAME.json``; anything else is a path."""
    if spec.startswith("embedded:"):
        path = _PACKAGE_CONFIGS / f"{spec.split(':', 1)[1]}.json"
        if not path.exists():
            known = sorted(p.stem for p in _PACKAGE_CONFIGS.glob("*.json"))
            raise FileNotFoundError(f"no packaged model config {spec!r}; known: {known}")
        return path
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model.config_file {spec!r} does not exist")
    return path


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer: ``cfg.tokenizer`` if given, else the checkpoint's, else the embedded BPE."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if source is None or source == "embedded":
        from mixsel.data.embedded import load_embedded_tokenizer

        return load_embedded_tokenizer()
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, tokenizer: Any | None = None) -> torch.nn.Module:
    """Build (or load) the causal LM described by ``cfg``; apply LoRA if enabled."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype={cfg.dtype!r} is not one of {sorted(_DTYPES)}")
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **kwargs)
        log.info("loaded model from %s", cfg.name_or_path)
    elif cfg.config_file:
        fields = json.loads(resolve_config_file(cfg.config_file).read_text())
        model_type = fields.pop("model_type", "llama")
        if tokenizer is not None:
            fields.setdefault("vocab_size", len(tokenizer))
            fields.setdefault("pad_token_id", tokenizer.pad_token_id)
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields.setdefault("bos_token_id", tokenizer.bos_token_id or tokenizer.eos_token_id)
        config = AutoConfig.for_model(model_type, **fields)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        log.info("built a fresh %s from %s", type(model).__name__, cfg.config_file)
    else:
        raise ValueError("set model.name_or_path (a checkpoint) or model.config_file (a fresh model)")
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
