"""From a :class:`mixsel.config.DataConfig` to a tokenised train/validation/test :class:`Mixture`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mixsel.config import DataConfig

__all__ = ["load_mixture", "load_mixture_records", "resolve_source", "split_mixture_records", "tokenize_mixture"]

log = logging.getLogger(__name__)


def resolve_source(cfg: DataConfig) -> str:
    """The data source as the summary shows it: the embedded corpus's file, an absolute path, or a hub name."""
    if cfg.source == "embedded":
        from mixsel.data.embedded import EMBEDDED_DIR

        return f"embedded ({Path(EMBEDDED_DIR) / 'corpus.jsonl.gz'})"
    if cfg.format != "hf" and (os.path.exists(cfg.source) or any(c in cfg.source for c in "*?[")):
        return os.path.abspath(cfg.source)
    extra = "".join(f", {k}={v}" for k, v in (("config", cfg.hf_config), ("split", cfg.hf_split)) if v)
    return f"Hugging Face dataset {cfg.source}{extra}"


def split_mixture_records(records: Sequence[dict], cfg: DataConfig, seed: int = 0) -> dict[str, list[dict]]:
    """Normalised records into train / validation / test as ``cfg`` says (domains, split sizes, train cap)."""
    from mixsel.data.loading import select_domains, split_records

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


def load_mixture_records(cfg: DataConfig, seed: int = 0) -> dict[str, list[dict]]:
    """Normalised records of each split (train / validation / test) for ``cfg``, each with its ``source`` id."""
    from mixsel.data.loading import load_records

    if cfg.source == "embedded":
        from mixsel.data.embedded import load_embedded_records

        records = load_embedded_records(with_sources=True)
    else:
        records = load_records(
            cfg.source,
            format=cfg.format,
            domain_column=cfg.domain_column,
            text_column=cfg.text_column,
            prompt_column=cfg.prompt_column,
            response_column=cfg.response_column,
            messages_column=cfg.messages_column,
            answer_column=cfg.answer_column,
            split_column=cfg.split_column,
            hf_config=cfg.hf_config,
            hf_split=cfg.hf_split,
            with_sources=True,
        )
    return split_mixture_records(records, cfg, seed)


def tokenize_mixture(splits: Mapping[str, Sequence[dict]], tokenizer: Any, cfg: DataConfig, *, source: str = "") -> Any:
    """Tokenise record splits as ``cfg`` says into a :class:`mixsel.data.Mixture` with its summary.

    Domain ids follow ``cfg.domains`` when set, else the sorted domains of the train split.
    """
    from mixsel.data.loading import domain_names
    from mixsel.data.summary import format_data_summary, summarize
    from mixsel.data.tokenize import Mixture, tokenize_records, uses_chat_template

    domains = list(cfg.domains) if cfg.domains else domain_names(splits["train"])
    tokenized = {
        name: tokenize_records(
            recs,
            tokenizer,
            domains=domains,
            max_length=cfg.max_length,
            truncation=cfg.truncation,
            separator=cfg.separator,
            chat_template=cfg.chat_template,
        )
        for name, recs in splits.items()
    }
    formatting = "chat template" if uses_chat_template(tokenizer, cfg.chat_template) else f"separator {cfg.separator!r}"
    summary = summarize(
        tokenized, source=source, max_length=cfg.max_length, truncation=cfg.truncation, formatting=formatting
    )
    log.debug("data summary:\n%s", format_data_summary(summary))
    cut = sum(summary.total(d).response_cut for d in domains)
    if cut:
        log.warning(
            "%d prompt/response rows have a response that does not fit data.max_length=%d (data.truncation=%s: "
            "cut or dropped); they are never scored (see the data summary)",
            cut,
            cfg.max_length,
            cfg.truncation,
        )
    return Mixture(domains=domains, **tokenized, summary=summary)


_MEMO: dict[str, Any] = {}


def _cache_key(cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    # the vocabulary, special tokens and chat template identify the tokenizer (its backend state changes with use)
    tok_id = json.dumps(
        [
            sorted(tokenizer.get_vocab().items()),
            str(tokenizer.all_special_tokens),
            str(getattr(tokenizer, "chat_template", None)),
        ]
    )
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


def _load_cached(path: Path) -> Any:
    """The cached mixture at ``path``, loaded with ``weights_only=True`` (only mixsel's own data
    classes are allowed, so a planted file cannot run code); None, with a warning, when the file is
    unreadable or from another mixsel version (it is then rebuilt and replaced)."""
    from mixsel.data.summary import DataSummary
    from mixsel.data.tokenize import DomainCounts, Mixture, TokenizedSplit

    try:
        with torch.serialization.safe_globals([Mixture, TokenizedSplit, DomainCounts, DataSummary]):
            mixture = torch.load(path, weights_only=True)
    except Exception as err:  # any unreadable cache is rebuilt, never trusted
        log.warning("ignoring the tokenised-mixture cache %s (%s); tokenising again", path, str(err).splitlines()[0])
        return None
    if not isinstance(mixture, Mixture):
        log.warning("ignoring the tokenised-mixture cache %s (not a mixture); tokenising again", path)
        return None
    if not all(hasattr(getattr(mixture, name), "sources") for name in ("train", "validation", "test")):
        log.warning("ignoring the tokenised-mixture cache %s (written without source ids); tokenising again", path)
        return None
    log.info("loaded the tokenised mixture from %s", path)
    return mixture


def load_mixture(cfg: DataConfig, tokenizer: Any, seed: int = 0, *, cache_dir: str | None = None) -> Any:
    """Load, split and tokenise the data described by ``cfg`` into a :class:`mixsel.data.Mixture`.

    ``mixture.summary`` is its :class:`mixsel.data.summary.DataSummary` (render it with
    :func:`mixsel.data.summary.format_data_summary`). Tokenised mixtures are memoised in-process
    and, with ``cache_dir`` (or ``$MIXSEL_CACHE``), on disk, keyed by the data config, the source
    file's size and time stamp, the seed and the tokenizer.
    """
    key = _cache_key(cfg, tokenizer, seed)
    if key in _MEMO:
        return _MEMO[key]
    cache_dir = cache_dir or os.environ.get("MIXSEL_CACHE")
    path = Path(cache_dir) / f"mixture-{key}.pt" if cache_dir else None
    mixture = _load_cached(path) if path is not None and path.exists() else None
    if mixture is None:
        mixture = tokenize_mixture(load_mixture_records(cfg, seed), tokenizer, cfg, source=resolve_source(cfg))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(mixture, tmp)
            os.replace(tmp, path)
    _MEMO.clear()  # keep one mixture in memory
    _MEMO[key] = mixture
    return mixture
