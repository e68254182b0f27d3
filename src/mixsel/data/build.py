"""From a :class:`mixsel.config.DataConfig` to a tokenised train/validation/test :class:`Mixture`."""

from __future__ import annotations

import logging
from typing import Any

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


def load_mixture(cfg: DataConfig, tokenizer: Any, seed: int = 0) -> Any:
    """Load, split and tokenise the data described by ``cfg`` into a :class:`mixsel.data.Mixture`."""
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
