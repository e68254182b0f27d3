"""Splits of a prepared corpus by index arithmetic: domains kept, train/validation/test, the train cap.

The rules are those of :func:`mixsel.data.build.split_mixture_records` on records
(:func:`mixsel.data.loading.select_domains`, :func:`mixsel.data.loading.split_records`, then the first
``max_train_per_domain`` train rows of each domain), applied to the prepared store's per-row arrays,
so a split is an ascending array of row numbers into the store and the same rows as the record path
picks (``tests/data/test_prepared.py`` checks both against each other). Rows that tokenisation dropped
(too long under ``truncation="drop"``, or without a target token) count in the split and the train cap
as they do on the record path, and are then left out, with the same counts and warnings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mixsel.config import DataConfig
from mixsel.errors import DataError

if TYPE_CHECKING:
    from mixsel.data.prepared import PreparedCorpus

__all__ = ["mixture_from_corpus", "split_rows"]

log = logging.getLogger(__name__)

_NAMES = ("train", "validation", "test")


def _selected_rows(corpus: PreparedCorpus, domains: list[str] | None) -> np.ndarray:
    """The rows of the domains kept (all when ``None``), ascending.

    Raises:
        ValueError: a domain that the data does not have.
    """
    if domains is None:
        return np.arange(len(corpus), dtype=np.int64)
    unknown = [d for d in domains if d not in corpus.domains]
    if unknown:
        raise DataError(
            f"unknown domain(s) {unknown} in data.domains; the data has domains {corpus.domains} "
            "(check the spelling or data.domain_column)"
        )
    wanted = np.array([corpus.domains.index(d) for d in domains], dtype=np.int32)
    return np.flatnonzero(np.isin(corpus.index["domain"], wanted)).astype(np.int64)


def _random_split(
    rows: np.ndarray, domain: np.ndarray, names: list[str], val: int, test: int, seed: int
) -> dict[str, np.ndarray]:
    """Each domain's rows permuted by the seeded ``torch.randperm`` of :func:`split_records`: the first
    ``test`` to test, the next ``val`` to validation, the rest to train; each split ascending."""
    from mixsel.data.loading import _domain_seed

    parts: dict[str, list[np.ndarray]] = {name: [] for name in _NAMES}
    dom = domain[rows]
    for d in np.unique(dom):
        members = rows[dom == d]
        n = len(members)
        if n - val - test < 1:
            raise DataError(
                f"domain {names[d]!r} has {n} examples: too few for test_per_domain={test} + "
                f"val_per_domain={val} and at least 1 train example; lower data.val_per_domain / "
                "data.test_per_domain or leave the domain out with data.domains=[...]"
            )
        gen = torch.Generator().manual_seed(_domain_seed(seed, names[d]))
        perm = torch.randperm(n, generator=gen).numpy()
        parts["test"].append(members[perm[:test]])
        parts["validation"].append(members[perm[test : test + val]])
        parts["train"].append(members[perm[test + val :]])
    return {name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for name, p in parts.items()}


def _check_split_sizes(val: int, test: int) -> None:
    for name, value in (("val_per_domain", val), ("test_per_domain", test)):
        if int(value) != value or value < 0:
            raise DataError(f"data.{name} must be a non-negative integer, got {value!r}")


def split_rows(corpus: PreparedCorpus, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """The rows of each split (before tokenisation drops), as :func:`split_mixture_records` assigns them.

    Raises:
        ValueError: as :func:`mixsel.data.loading.split_records` does.
    """
    val, test = cfg.val_per_domain, cfg.test_per_domain
    _check_split_sizes(val, test)
    rows = _selected_rows(corpus, cfg.domains)
    domain, tagged = corpus.index["domain"], corpus.index["split"][rows]
    if not (tagged >= 0).any():
        out = _random_split(rows, domain, corpus.domains, val, test, seed)
    else:
        if (tagged < 0).any():
            raise DataError(
                f"{int((tagged < 0).sum())} of {len(rows)} records have no split while the others do; "
                "give every row a split value, or unset data.split_column to split automatically"
            )
        out = {name: rows[tagged == code] for code, name in enumerate(_NAMES)}
        missing = [name for name in ("validation", "test") if not len(out[name])]
        carve = (val if "validation" in missing else 0, test if "test" in missing else 0)
        if missing and sum(carve):
            log.info("the data has no %s split; taking it from train per domain", " / ".join(missing))
            carved = _random_split(out["train"], domain, corpus.domains, carve[0], carve[1], seed)
            out["train"] = carved["train"]
            for name in missing:
                out[name] = carved[name]
        have = set(domain[out["train"]].tolist())
        lacking = [corpus.domains[d] for d in sorted(set(domain[rows].tolist())) if d not in have]
        if lacking:
            raise DataError(
                f"domain(s) {lacking} have no train examples in the given split column; add train rows "
                "or leave them out with data.domains=[...]"
            )
    if cfg.max_train_per_domain is not None:
        out["train"] = _cap(out["train"], domain, int(cfg.max_train_per_domain))
    return out


def _cap(rows: np.ndarray, domain: np.ndarray, cap: int) -> np.ndarray:
    """The first ``cap`` rows of each domain, in order."""
    dom = domain[rows]
    keep = np.zeros(len(rows), dtype=bool)
    for d in np.unique(dom):
        keep[np.flatnonzero(dom == d)[:cap]] = True
    return rows[keep]


def _split(corpus: PreparedCorpus, rows: np.ndarray, domains: list[str], max_length: int) -> Any:
    """The :class:`TokenizedSplit` of ``rows`` (dropped rows counted, then left out), memory-mapped."""
    from mixsel.data.tokenize import KEPT, NO_TARGET, DomainCounts, StoreColumn, TokenizedSplit, _warn_no_target

    idx = corpus.index
    to_mixture = np.full(len(corpus.domains), -1, dtype=np.int64)
    for i, name in enumerate(domains):
        to_mixture[corpus.domains.index(name)] = i
    dom = to_mixture[idx["domain"][rows]]
    status = idx["status"][rows]
    kept = status == KEPT
    counts = {}
    for i, name in enumerate(domains):
        mine, mine_kept = dom == i, (dom == i) & kept
        scored = mine_kept & (idx["scored"][rows] == 1)
        counts[name] = DomainCounts(
            rows=int(mine_kept.sum()),
            instruction=int((mine_kept & (idx["instruction"][rows] == 1)).sum()),
            truncated=int(idx["truncated"][rows][mine].sum()),
            response_cut=int(idx["response_cut"][rows][mine].sum()),
            dropped=int((mine & ~kept).sum()),
            scored=int(scored.sum()),
            response_tokens_max=int(idx["response_tokens"][rows][scored].max(initial=0)),
        )
    no_target = int((status == NO_TARGET).sum())
    if no_target:
        _warn_no_target(no_target, len(rows), max_length)
    chosen = rows[kept]
    table = corpus.table
    return TokenizedSplit(
        domains=list(domains),
        domain_ids=torch.from_numpy(dom[kept]),
        input_ids=StoreColumn(table, "input_ids", chosen, tensors=True, dataset=corpus.dataset),
        labels=StoreColumn(table, "labels", chosen, tensors=True),
        prompts=StoreColumn(table, "prompt_text", chosen),
        answers=StoreColumn(table, "reference", chosen),
        counts=counts,
        sources=StoreColumn(table, "source", chosen),
        targets=torch.from_numpy(idx["num_targets"][chosen].astype(np.int64)),
    )


def mixture_from_corpus(corpus: PreparedCorpus, cfg: DataConfig, tokenizer: Any, seed: int, *, source: str = "") -> Any:
    """The :class:`mixsel.data.Mixture` of ``cfg`` on a prepared corpus, with its summary.

    Domain ids follow ``cfg.domains`` when set, else the sorted domains of the train split.
    """
    from mixsel.data.build import finish_mixture

    rows = split_rows(corpus, cfg, seed)
    if cfg.domains:
        domains = list(cfg.domains)
    else:
        domains = [corpus.domains[d] for d in sorted(set(corpus.index["domain"][rows["train"]].tolist()))]
    splits = {name: _split(corpus, rows[name], domains, cfg.max_length) for name in _NAMES}
    return finish_mixture(splits, domains, tokenizer, cfg, source=source)
