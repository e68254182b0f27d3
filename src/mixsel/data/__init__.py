"""Multi-domain data: loading (JSONL / Parquet / CSV / Hugging Face ``datasets``), splitting,
tokenisation with prompt masking (chat template or separator, truncation that keeps the response),
the data summary, and the :class:`CandidateSampler` that draws candidate pools.

Only torch is imported here; pandas, pyarrow, ``datasets`` and tqdm are imported by the functions
that use them. The embedded corpus lives in :mod:`mixsel.data.embedded`, the config-driven loader in
:mod:`mixsel.data.build` and the Hugging Face ``Trainer`` datasets in :mod:`mixsel.data.sft`
(imported on demand). ``docs/data.md`` describes the formats, truncation and answer checking.
"""

from __future__ import annotations

from mixsel.data.loading import (
    SPLITS,
    domain_names,
    load_records,
    normalize_records,
    select_domains,
    split_records,
)
from mixsel.data.sampler import CandidateSampler
from mixsel.data.summary import DataSummary, format_data_summary
from mixsel.data.tokenize import (
    IGNORE_INDEX,
    TRUNCATION_MODES,
    DomainCounts,
    Mixture,
    TokenizedSplit,
    format_instructions,
    tokenize_records,
    uses_chat_template,
)

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "TRUNCATION_MODES",
    "CandidateSampler",
    "DataSummary",
    "DomainCounts",
    "Mixture",
    "TokenizedSplit",
    "domain_names",
    "format_data_summary",
    "format_instructions",
    "load_records",
    "normalize_records",
    "select_domains",
    "split_records",
    "tokenize_records",
    "uses_chat_template",
]
