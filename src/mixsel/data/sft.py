"""Tokenised, prompt-masked datasets for the Hugging Face ``Trainer`` route (``SelectionTrainer``).

:func:`sft_datasets` runs the data layer of ``mixsel train`` (the same loading, per-domain splitting
and :func:`~mixsel.data.tokenize.tokenize_records`) and returns ``datasets.Dataset`` objects with
``input_ids``, ``labels`` (-100 on prompt tokens) and ``domain`` (the name) columns, ready for
:class:`mixsel.integrations.hf.SelectionTrainer` with a
:class:`~mixsel.integrations.hf_utils.CausalLMCollator`::

    from mixsel.config import DataConfig
    from mixsel.data.sft import sft_datasets

    data = sft_datasets(tokenizer, DataConfig(source="mix.jsonl", max_length=512, val_per_domain=16))
    print(format_data_summary(data.summary))          # mixsel.data.summary
    trainer = SelectionTrainer(model=model, args=SelectionConfig(..., domains=data.domains),
                               train_dataset=data.train, eval_dataset=data.validation, processing_class=tokenizer)

Rows may also be given in memory (a list of dicts, a ``datasets.Dataset`` or ``DatasetDict``), with
the column conventions of :func:`mixsel.data.loading.normalize_records` (``text``; ``prompt`` +
``response`` or ``completion``; ``messages``; ``answer``; ``split``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixsel.config import DataConfig

__all__ = ["SFTDatasets", "sft_datasets", "split_to_dataset"]


@dataclass
class SFTDatasets:
    """The three splits as ``datasets.Dataset`` (``input_ids``, ``labels``, ``domain``), and what they hold."""

    # the train split
    train: Any
    # the validation split: val_per_domain rows of every domain
    validation: Any
    # the test split: test_per_domain rows of every domain
    test: Any
    # domain names in id order (pass them as SelectionConfig.domains)
    domains: list[str]
    # rows per split and what truncation did (render with mixsel.data.summary.format_data_summary)
    summary: Any
    # the tokenised splits, e.g. for mixsel.evaluate.exact_match
    mixture: Any


def split_to_dataset(split: Any) -> Any:
    """A ``datasets.Dataset`` with ``input_ids``, ``labels`` and ``domain`` columns from a TokenizedSplit.

    A split of a prepared corpus (what :func:`mixsel.data.load_mixture` returns) becomes a view of
    the corpus's memory-mapped Arrow files (``Dataset.select`` of its rows): nothing is copied, so
    the Trainer reads the very tokens ``mixsel train`` trains on. A split built in memory is copied.
    """
    import datasets

    from mixsel.data.tokenize import StoreColumn

    if isinstance(split.input_ids, StoreColumn) and split.input_ids.dataset is not None:
        view = split.input_ids.dataset.select(split.input_ids.rows, keep_in_memory=True)
        return view.select_columns(["input_ids", "labels", "domain"])
    return datasets.Dataset.from_dict(
        {
            "input_ids": [x.tolist() for x in split.input_ids],
            "labels": [y.tolist() for y in split.labels],
            "domain": [split.domains[int(d)] for d in split.domain_ids],
        }
    )


def _records(rows: Any, cfg: DataConfig) -> list[dict[str, Any]]:
    """Normalised records of in-memory rows, with source ids ``"rows:<index>"`` (a ``DatasetDict``'s
    ``"rows:<split>:<index>"``)."""
    from mixsel.data.loading import _CHUNK_ROWS, _numbered, hf_chunks, normalize_records

    split_column = cfg.split_column
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):  # a datasets.Dataset or DatasetDict
        chunks, split_column = hf_chunks(rows, "rows", split_column, _CHUNK_ROWS)
        rows, sources = [], []
        for chunk, ids in chunks():
            rows.extend(chunk)
            sources.extend(ids)
    else:
        sources = _numbered("rows", len(rows))
    options = {**cfg.column_options(), "split_column": split_column}
    return normalize_records([dict(r) for r in rows], **options, sources=sources)


def sft_datasets(
    tokenizer: Any,
    cfg: DataConfig | None = None,
    *,
    rows: Sequence[Mapping[str, Any]] | Any | None = None,
    seed: int = 0,
) -> SFTDatasets:
    """Load, split per domain and tokenise (prompt masked) a mixture for the Hugging Face ``Trainer``.

    Args:
        tokenizer: the model's tokenizer; its chat template is applied to prompt/response and
            conversation rows when it has one (``cfg.chat_template``).
        cfg: where the data is and how to tokenise it (``source``, columns, ``max_length``,
            ``truncation``, ``separator``, ``val_per_domain``, ...); default ``DataConfig()``.
        rows: in-memory rows to use instead of ``cfg.source``: a list of dicts, a
            ``datasets.Dataset`` or a ``datasets.DatasetDict`` (its split names are kept).
        seed: seeds the per-domain split (as ``mixsel train``'s ``seed``).

    Returns:
        :class:`SFTDatasets`: ``train`` / ``validation`` / ``test`` datasets, the domain names and
        the data summary.

    Raises:
        ValueError: from loading, splitting or tokenisation, naming the problem and the fix.
    """
    from mixsel.data.build import load_mixture, split_mixture_records, tokenize_mixture

    cfg = cfg or DataConfig()
    if rows is None:
        mixture = load_mixture(cfg, tokenizer, seed=seed)
    else:
        splits = split_mixture_records(_records(rows, cfg), cfg, seed)
        mixture = tokenize_mixture(splits, tokenizer, cfg, source="rows given in memory")
    return SFTDatasets(
        train=split_to_dataset(mixture.train),
        validation=split_to_dataset(mixture.validation),
        test=split_to_dataset(mixture.test),
        domains=list(mixture.domains),
        summary=mixture.summary,
        mixture=mixture,
    )
