"""mixsel's embedded default corpus: seven domains of real text, and a byte-level BPE for it.

The files next to this module are built by ``scripts/build_corpus.py`` (provenance and licences in
``PROVENANCE.md`` here and in ``docs/corpus.md``):

* ``corpus.jsonl.gz``: one record per line, ``{"domain", "split", "text"}`` for plain-text domains
  and ``{"domain", "split", "prompt", "response", "answer"}`` for question/answer domains
  (``arithmetic``, ``chemistry``; ``answer`` is the canonical final answer, the response ends with
  ``#### <answer>``). Splits are ``train``, ``validation`` and ``test``, disjoint, 32-64 validation
  and test examples per domain.
* ``tokenizer.json`` (+ ``tokenizer_config.json``): byte-level BPE with 4096 tokens, trained on the
  train split; ``<|endoftext|>`` is the end (and beginning) of text token, ``<|pad|>`` pads. It adds
  no special tokens by itself: append ``eos_token_id`` where a sequence should end.
* ``stats.json``: examples and tokens per domain and split.

Example:
    >>> from mixsel.data.embedded import load_embedded_records, load_embedded_tokenizer, record_text
    >>> val = load_embedded_records("validation")
    >>> tok = load_embedded_tokenizer()
    >>> ids = tok(record_text(val[0]))["input_ids"]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixsel.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "EMBEDDED_DIR",
    "EMBEDDED_DOMAINS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "QA_DOMAINS",
    "SPLITS",
    "embedded_tokenizer_path",
    "load_embedded_records",
    "load_embedded_tokenizer",
    "record_text",
]

#: Folder holding the corpus, tokenizer and statistics.
EMBEDDED_DIR: Path = Path(__file__).resolve().parent
#: Domain names in a fixed order (largest first, as built).
EMBEDDED_DOMAINS: tuple[str, ...] = (
    "python_code",
    "scripture",
    "dictionary",
    "arithmetic",
    "tech_docs",
    "chemistry",
    "legal",
)
#: Domains whose records are prompt/response/answer triples.
QA_DOMAINS: tuple[str, ...] = ("arithmetic", "chemistry")
#: Split names, in file order.
SPLITS: tuple[str, ...] = ("train", "validation", "test")
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"

_CORPUS = "corpus.jsonl.gz"


def record_text(record: dict[str, Any]) -> str:
    """The full text of a record: ``text``, or ``prompt + "\\n" + response`` (as the BPE was trained)."""
    if "text" in record:
        return record["text"]
    return f"{record['prompt']}\n{record['response']}"


@functools.lru_cache(maxsize=1)
def _read_all() -> tuple[tuple[int, dict[str, Any]], ...]:
    """``(1-based line number, record)`` of every non-blank line of the corpus file."""
    path = EMBEDDED_DIR / _CORPUS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/build_corpus.py`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple((line_no, json.loads(line)) for line_no, line in enumerate(f, start=1) if line.strip())


def load_embedded_records(split: str | None = None, *, with_sources: bool = False) -> list[dict[str, Any]]:
    """Records of the embedded corpus, in file order (domain, then split, then a seeded shuffle).

    Args:
        split: ``"train"``, ``"validation"``, ``"test"``, or ``None`` for all three.
        with_sources: give each record a ``source``, ``"corpus.jsonl.gz:<line>"`` (its 1-based line
            number in the decompressed corpus file), as :func:`mixsel.data.loading.load_records` does.

    Returns:
        A new list of new dicts (safe to mutate), each with ``domain`` and ``split`` keys and either
        ``text`` or ``prompt``/``response``/``answer`` (and ``source`` with ``with_sources``).

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS` or ``None``.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    out = []
    for line_no, rec in _read_all():
        if split is None or rec["split"] == split:
            out.append({**rec, "source": f"{_CORPUS}:{line_no}"} if with_sources else dict(rec))
    return out


def embedded_tokenizer_path() -> Path:
    """Path of the embedded ``tokenizer.json`` (loadable by ``tokenizers.Tokenizer.from_file``)."""
    return EMBEDDED_DIR / "tokenizer.json"


def load_embedded_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded BPE as a ``transformers.PreTrainedTokenizerFast``, offline.

    ``eos_token`` and ``bos_token`` are ``<|endoftext|>``, ``pad_token`` is ``<|pad|>``; padding is
    on the right. Needs the ``hf`` extra (transformers).
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(embedded_tokenizer_path()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "right"
    return tok
