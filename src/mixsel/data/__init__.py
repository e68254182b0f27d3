"""Multi-domain data: loading (JSONL / Parquet / CSV / Hugging Face ``datasets``), splitting,
tokenisation with prompt masking, and the :class:`CandidateSampler` that draws candidate pools.

Only torch is imported here; pandas, pyarrow, ``datasets`` and tqdm are imported by the functions
that use them. The embedded corpus lives in :mod:`mixsel.data.embedded` (imported on demand).
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
from mixsel.data.tokenize import IGNORE_INDEX, Mixture, TokenizedSplit, tokenize_records

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "CandidateSampler",
    "Mixture",
    "TokenizedSplit",
    "domain_names",
    "load_records",
    "normalize_records",
    "select_domains",
    "split_records",
    "tokenize_records",
]
