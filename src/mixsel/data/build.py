"""From a :class:`mixsel.config.DataConfig` to a tokenised train/validation/test :class:`Mixture`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mixsel.config import DataConfig

__all__ = [
    "load_mixture",
    "load_mixture_records",
    "record_chunks",
    "resolve_source",
    "split_mixture_records",
    "tokenize_mixture",
]

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


def record_chunks(cfg: DataConfig) -> Iterator[list[dict]]:
    """Chunks of the normalised records of ``cfg.source`` (every split), each with its ``source`` id,
    read without holding the whole source (:func:`mixsel.data.loading.iter_records`)."""
    from mixsel.data.loading import iter_records

    if cfg.source == "embedded":
        from mixsel.data.embedded import load_embedded_records

        records = load_embedded_records(with_sources=True)
        for start in range(0, len(records), 10_000):
            yield records[start : start + 10_000]
        return
    yield from iter_records(
        cfg.source,
        format=cfg.format,
        **cfg.column_options(),
        hf_config=cfg.hf_config,
        hf_split=cfg.hf_split,
        with_sources=True,
    )


def load_mixture_records(cfg: DataConfig, seed: int = 0) -> dict[str, list[dict]]:
    """Normalised records of each split (train / validation / test) for ``cfg``, each with its ``source`` id."""
    return split_mixture_records([rec for chunk in record_chunks(cfg) for rec in chunk], cfg, seed)


def tokenize_mixture(splits: Mapping[str, Sequence[dict]], tokenizer: Any, cfg: DataConfig, *, source: str = "") -> Any:
    """Tokenise record splits as ``cfg`` says into a :class:`mixsel.data.Mixture` with its summary.

    For rows held in memory (:func:`mixsel.data.sft.sft_datasets` with ``rows=``); a source on disk
    goes through the prepared store (:func:`load_mixture`). Domain ids follow ``cfg.domains`` when
    set, else the sorted domains of the train split.
    """
    from mixsel.data.loading import domain_names
    from mixsel.data.tokenize import tokenize_records

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
    return finish_mixture(tokenized, domains, tokenizer, cfg, source=source)


def finish_mixture(
    tokenized: Mapping[str, Any], domains: list[str], tokenizer: Any, cfg: DataConfig, *, source: str
) -> Any:
    """The :class:`mixsel.data.Mixture` of tokenised splits, with its summary (and a warning for cut responses)."""
    from mixsel.data.summary import format_data_summary, summarize
    from mixsel.data.tokenize import Mixture, uses_chat_template

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


_MEMO: dict[tuple[str, str], Any] = {}

#: The DataConfig fields that only choose rows of a prepared corpus (with the seed).
_SPLIT_FIELDS = ("domains", "val_per_domain", "test_per_domain", "max_train_per_domain")


def load_mixture(
    cfg: DataConfig, tokenizer: Any, seed: int = 0, *, cache_dir: str | None = None, progress: bool | None = None
) -> Any:
    """Load, split and tokenise the data described by ``cfg`` into a :class:`mixsel.data.Mixture`.

    The source is prepared once into a memory-mapped store (:func:`mixsel.data.prepared.prepare_corpus`:
    tokenised with ``datasets.map``, cached under ``data.cache_dir`` / ``$MIXSEL_CACHE`` / the
    ``datasets`` cache, keyed by the source's content, the tokenizer and the tokenisation options);
    the splits are index arrays into it (:mod:`mixsel.data.split_index`), so the rows stay on disk.
    ``mixture.summary`` is its :class:`mixsel.data.summary.DataSummary` (render it with
    :func:`mixsel.data.summary.format_data_summary`); ``mixture.corpus`` the store.

    Args:
        cfg: the data settings.
        tokenizer: the model's tokenizer.
        seed: seeds the per-domain split.
        cache_dir: overrides ``cfg.cache_dir``.
        progress: show the preparation's progress bars (default: for 20,000 rows or more).
    """
    from mixsel.data.prepared import prepare_corpus

    if cfg.streaming:
        from mixsel.errors import DataError

        raise DataError(
            "data.streaming=true reads the source as a stream in mixsel train (mixsel.data.streaming.load_streaming) "
            "and never prepares it; this route needs the prepared store: set data.streaming=false"
        )
    corpus = prepare_corpus(cfg, tokenizer, cache_dir=cache_dir, progress=progress)
    memo = (corpus.manifest["key"], json.dumps([[getattr(cfg, f) for f in _SPLIT_FIELDS], seed]))
    if memo in _MEMO:
        return _MEMO[memo]
    mixture = corpus.mixture(cfg, tokenizer, seed, source=resolve_source(cfg))
    mixture.corpus = corpus
    _MEMO.clear()  # keep one mixture in memory
    _MEMO[memo] = mixture
    return mixture
