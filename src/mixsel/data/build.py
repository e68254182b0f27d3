"""From a :class:`mixsel.config.DataConfig` to a tokenised train/validation/test :class:`Mixture`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mixsel.config import DataConfig

__all__ = ["load_mixture", "load_mixture_records"]

log = logging.getLogger(__name__)


def load_mixture_records(cfg: DataConfig, seed: int = 0) -> dict[str, list[dict]]:
    """Normalised records of each split (train / validation / test) for ``cfg``."""
    from mixsel.data.loading import load_records, select_domains, split_records

    if cfg.source == "embedded":
        from mixsel.data.embedded import load_embedded_records

        records = load_embedded_records()
    else:
        records = load_records(
            cfg.source,
            format=cfg.format,
            domain_column=cfg.domain_column,
            text_column=cfg.text_column,
            prompt_column=cfg.prompt_column,
            response_column=cfg.response_column,
            answer_column=cfg.answer_column,
            split_column=cfg.split_column,
            hf_config=cfg.hf_config,
            hf_split=cfg.hf_split,
        )
    records = select_domains(records, cfg.domains)
    splits = split_records(records, val_per_domain=cfg.val_per_domain, test_per_domain=cfg.test_per_domain, seed=seed)
    if cfg.max_train_per_domain is not None:
        kept: dict[str, int] = {}
        train = []
        for rec in splits["train"]:
            if kept.get(rec["domain"], 0) < cfg.max_train_per_domain:
                kept[rec["domain"]] = kept.get(rec["domain"], 0) + 1
                train.append(rec)
        splits["train"] = train
    return splits


_MEMO: dict[str, Any] = {}


def _cache_key(cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    # the vocabulary and special tokens identify the tokenizer (its backend state changes with use)
    tok_id = json.dumps([sorted(tokenizer.get_vocab().items()), str(tokenizer.all_special_tokens)])
    source = cfg.source
    if cfg.source != "embedded" and os.path.exists(cfg.source):
        st = os.stat(cfg.source)
        source = f"{os.path.abspath(cfg.source)}:{st.st_size}:{st.st_mtime_ns}"
    elif cfg.source == "embedded":
        from mixsel.data.embedded import EMBEDDED_DIR

        st = os.stat(Path(EMBEDDED_DIR) / "corpus.jsonl.gz")
        source = f"embedded:{st.st_size}:{st.st_mtime_ns}"
    blob = json.dumps([dataclasses.asdict(cfg), source, seed, hashlib.sha256(tok_id.encode()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_mixture(cfg: DataConfig, tokenizer: Any, seed: int = 0, *, cache_dir: str | None = None) -> Any:
    """Load, split and tokenise the data described by ``cfg`` into a :class:`mixsel.data.Mixture`.

    Tokenised mixtures are memoised in-process and, with ``cache_dir`` (or ``$MIXSEL_CACHE``), on disk,
    keyed by the data config, the source file's size and time stamp, the seed and the tokenizer.
    """
    key = _cache_key(cfg, tokenizer, seed)
    if key in _MEMO:
        return _MEMO[key]
    cache_dir = cache_dir or os.environ.get("MIXSEL_CACHE")
    path = Path(cache_dir) / f"mixture-{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        mixture = torch.load(path, weights_only=False)
        log.info("loaded the tokenised mixture from %s", path)
    else:
        mixture = _load_mixture(cfg, tokenizer, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(mixture, tmp)
            os.replace(tmp, path)
    _MEMO.clear()  # keep one mixture in memory
    _MEMO[key] = mixture
    return mixture


def _load_mixture(cfg: DataConfig, tokenizer: Any, seed: int) -> Any:
    from mixsel.data.loading import domain_names
    from mixsel.data.tokenize import Mixture, tokenize_records

    splits = load_mixture_records(cfg, seed)
    domains = list(cfg.domains) if cfg.domains else domain_names(splits["train"])
    tokenized = {
        name: tokenize_records(recs, tokenizer, domains=domains, max_length=cfg.max_length)
        for name, recs in splits.items()
    }
    mixture = Mixture(domains=domains, **tokenized)
    sizes = mixture.train.domain_counts().tolist()
    log.info("domains and train sizes: %s", dict(zip(domains, sizes)))
    return mixture
