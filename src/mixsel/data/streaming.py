"""Streaming data (``data.streaming=true``): train on a source read as a stream, never prepared.

For sources that should not be prepared in full (a hub dataset, files larger than the disk budget),
``mixsel train`` reads the source in stream order and keeps a bounded buffer of tokenised training
rows per domain; each step's candidate pool is drawn from those buffers by the current domain weights.

* **The stream.** Local files, a folder or glob of them, a ``save_to_disk`` folder and the embedded
  corpus are read by :func:`mixsel.data.loading.iter_records` (in chunks, with the column rules of
  :func:`mixsel.data.loading.load_records`; it scans the files once for their columns each time the
  stream is opened). ``data.format=hf`` (a hub dataset, or local files through
  ``datasets.load_dataset``) is read with ``datasets.load_dataset(..., streaming=True)``: an
  ``IterableDataset`` that downloads as it goes and writes no Arrow cache. Its column mapping is
  resolved from the **first chunk** (1,000 rows) with the same rules, as a stream cannot be scanned
  first; a column that appears only later is not read. A row is identified by its *position*: its
  index among the normalised records of the stream (rows of other domains included).
* **Held-out rows.** Of each domain of ``data.domains`` (required: the domains cannot be found by a
  scan), the first ``data.val_per_domain`` rows in stream order are the validation split and the
  next ``data.test_per_domain`` rows the test split (small in-memory splits,
  :func:`held_out_records`); every later row is a training row, up to ``data.max_train_per_domain``
  per domain and pass when that is set. The rule is applied again on every pass, so held-out rows
  are never trained on. A ``split`` column in the data is ignored (with one warning).
* **Buffers.** Each domain holds at most ``data.stream_buffer`` tokenised training rows (rows that
  tokenisation drops are counted per domain and never buffered). A draw allocates the pool's slots
  per domain exactly as :class:`mixsel.data.sampler.CandidateSampler` does
  (:func:`mixsel.data.sampler.allocate_counts`), then for each domain with slots tops its buffer up
  by reading on (records are read and tokenised ``min(256, stream_buffer)`` at a time) and takes
  rows from it in a seeded random order; a taken row leaves the buffer. Without weights (the
  *natural* mixture) the pool follows the domain shares of the training rows read so far.
* **Overflow policy: skip and count.** Reading on for one domain also reads the other domains'
  rows: they fill their own buffers while those have room; a row whose domain's buffer is full is
  *skipped*, counted per domain (:attr:`StreamingSampler.skipped`), with one warning when it first
  happens and a per-pass line of the counts. A skipped row is not lost for good: it comes again on
  the next pass. (A bounded overflow would only move the same choice one buffer later.)
* **Passes.** When the stream ends and a domain's buffer cannot serve its slots, the next pass (an
  epoch) re-opens the stream from its start; rows still buffered from the last pass are not read
  in twice. A domain that gets no training row in a whole pass stops the run with one line.
* **Exact resume.** :meth:`StreamingSampler.state_dict` holds the stream position (pass, rows read
  in it, rows per domain in it), the positions of the rows in every buffer, a checksum of those
  rows, the counters and the generator state. :meth:`StreamingSampler.load_state_dict` re-reads
  the stream up to the farthest buffered position to restore the buffers exactly (checking the
  checksum: the source must not have changed), and the next read re-opens the stream at the saved
  position, so a resumed run draws bit-for-bit the pools of an uninterrupted one.

Pool ids are positions; :meth:`StreamingSampler.collate` and :meth:`StreamingSampler.source_of`
read the rows of the latest draw (what ``Engine.plan`` collates and ``selections.jsonl`` names).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mixsel.config import DataConfig
from mixsel.data.sampler import CandidateSampler, allocate_counts, check_weights
from mixsel.data.tokenize import IGNORE_INDEX, KEPT, TokenizedSplit, _source_id, encode_rows, row_outcome
from mixsel.errors import DataError

__all__ = ["StreamingSampler", "held_out_records", "load_streaming", "stream_records"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_READ_ROWS = 256  # records read and tokenised together (at most data.stream_buffer)
_HUB_CHUNK = 1000  # rows per chunk of a datasets stream
_ALLOCATIONS = ("multinomial", "proportional")

Chunks = Iterable[list[dict[str, Any]]]


# --------------------------------------------------------------------------------------------------
# the stream of normalised records
# --------------------------------------------------------------------------------------------------


def _hub_dataset(cfg: DataConfig) -> tuple[Any, str]:
    """The ``datasets.IterableDataset`` of ``cfg`` (``format=hf``) and the prefix of its rows' source ids."""
    import datasets

    from mixsel.data.loading import _hf_source

    stream, prefix = _hf_source(
        cfg.source, hf_name=None, hf_config=cfg.hf_config, hf_split=cfg.hf_split, streaming=True
    )
    if isinstance(stream, datasets.IterableDatasetDict):
        if len(stream) != 1:
            raise DataError(
                f"the dataset {cfg.source!r} has splits {list(stream)} and a stream reads one: set data.hf_split=<name>"
            )
        name = next(iter(stream))
        stream, prefix = stream[name], f"{prefix}:{name}"
    return stream, prefix


def _hub_chunks(cfg: DataConfig, size: int = _HUB_CHUNK) -> Iterator[list[dict[str, Any]]]:
    """Chunks of normalised records of a ``datasets`` stream; the columns are resolved from the first chunk."""
    from mixsel.data.loading import _normalize_rows, _resolve_columns, _warn_dropped

    stream, prefix = _hub_dataset(cfg)
    cols = None
    offset = 0
    dropped: Counter[str] = Counter()
    for batch in stream.iter(batch_size=size):
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        if cols is None:  # a stream cannot be scanned first: its first chunk decides the column mapping
            cols = _resolve_columns(keys, **{**cfg.column_options(), "split_column": None})
        ids = [f"{prefix}:{offset + i}" for i in range(len(rows))]
        records, empty, lost = _normalize_rows(rows, cols, "default", ids, offset)
        if empty:
            raise DataError(
                f"{empty} of the stream's rows {offset}..{offset + len(rows) - 1} have an empty value in the domain "
                f"column {cfg.domain_column!r}; fill in their domain or remove those rows"
            )
        dropped.update(lost)
        offset += len(rows)
        if records:
            yield records
    if not offset:
        raise DataError("the stream holds no rows; check data.source (and data.hf_split)")
    if dropped and cols is not None:
        _warn_dropped(dropped, cols, cfg.text_column)


def stream_records(cfg: DataConfig) -> Iterator[list[dict[str, Any]]]:
    """Chunks of the normalised records of ``cfg.source`` in stream order, each with its ``source`` id.

    ``format=hf`` (not a ``save_to_disk`` folder) streams through ``datasets``; anything else is read by
    :func:`mixsel.data.loading.iter_records` (module docstring). Nothing is prepared or cached.
    """
    from mixsel.data.loading import _is_saved_dataset

    if cfg.format == "hf" and not _is_saved_dataset(cfg.source):
        yield from _hub_chunks(cfg)
        return
    from mixsel.data.build import record_chunks

    yield from record_chunks(cfg)


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def held_out_records(
    cfg: DataConfig, chunks: Chunks | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The validation and test records of a stream: of each domain of ``cfg.domains``, its first
    ``cfg.val_per_domain`` rows, then its next ``cfg.test_per_domain`` rows, in stream order.

    Reads the stream (``chunks``, default :func:`stream_records`) only as far as needed.

    Raises:
        DataError: the stream ends before a domain has that many rows.
    """
    domains = list(cfg.domains or [])
    val, test = int(cfg.val_per_domain), int(cfg.test_per_domain)
    held = val + test
    seen = dict.fromkeys(domains, 0)
    out: dict[str, list[dict[str, Any]]] = {"validation": [], "test": []}
    if not held:
        return [], []
    source = stream_records(cfg) if chunks is None else chunks
    try:
        for chunk in source:
            for rec in chunk:
                k = seen.get(rec["domain"])
                if k is None or k >= held:
                    continue
                seen[rec["domain"]] = k + 1
                out["validation" if k < val else "test"].append(rec)
            if all(n >= held for n in seen.values()):
                break
    finally:
        _close(source)
    short = {d: n for d, n in seen.items() if n < held}
    if short:
        raise DataError(
            f"the stream ended with too few rows of domain(s) {short} (rows found) for data.val_per_domain={val} + "
            f"data.test_per_domain={test} held out per domain; check data.domains (spelling, data.domain_column) "
            "or lower data.val_per_domain / data.test_per_domain"
        )
    if any("split" in rec for rec in out["validation"] + out["test"]):
        log.warning(
            "the data has a split column; data.streaming=true ignores it: the first data.val_per_domain, then "
            "data.test_per_domain rows of each domain are held out"
        )
    return out["validation"], out["test"]


def _settings(cfg: DataConfig) -> dict[str, Any]:
    return {
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "separator": cfg.separator,
        "chat_template": cfg.chat_template,
    }


def load_streaming(
    cfg: DataConfig, tokenizer: Any, *, pool_size: int, seed: int, allocation: str = "multinomial"
) -> tuple[Any, StreamingSampler]:
    """The held-out :class:`mixsel.data.Mixture` of a stream and the :class:`StreamingSampler` of its training rows.

    The mixture's train split is empty (the rows are the sampler's); its summary says the training
    rows are streamed. Nothing is prepared.

    Raises:
        DataError: ``cfg.domains`` is not set, or the stream has too few rows to hold out.
    """
    from mixsel.data.build import finish_mixture, resolve_source
    from mixsel.data.tokenize import tokenize_records

    if not cfg.domains:
        raise DataError("data.streaming=true needs data.domains=[...]: a stream cannot be scanned for its domains")
    domains = list(cfg.domains)
    validation, test = held_out_records(cfg)
    tokenized = {
        "train": TokenizedSplit(domains, torch.zeros(0, dtype=torch.long), [], []),
        "validation": tokenize_records(validation, tokenizer, domains=domains, **_settings(cfg)),
        "test": tokenize_records(test, tokenizer, domains=domains, **_settings(cfg)),
    }
    mixture = finish_mixture(tokenized, domains, tokenizer, cfg, source=resolve_source(cfg))
    mixture.summary.streaming = (
        f"training rows: read as a stream (data.streaming=true; their number is not known up front), "
        f"{cfg.stream_buffer} buffered per domain; truncated / dropped count the held-out rows"
    )
    sampler = StreamingSampler.from_config(cfg, tokenizer, pool_size=pool_size, seed=seed, allocation=allocation)
    return mixture, sampler


# --------------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """A tokenised training row in a buffer."""

    # its index among the stream's normalised records (the pool id)
    position: int
    # its domain id
    domain: int
    input_ids: torch.Tensor
    labels: torch.Tensor
    # where it came from (file:line, dataset:split:index)
    source: str


class StreamingSampler:
    """Seeded, resumable sampler of candidate pools from a stream, by domain weights (module docstring).

    Args:
        open_stream: returns a fresh iterable of chunks (lists) of normalised records, in stream order.
        domains: the domain names in id order; rows of other domains are passed over.
        tokenizer: the model's tokenizer.
        pool_size: rows per pool.
        seed: seed of the sampler's private generator.
        buffer_size: tokenised training rows buffered per domain (``data.stream_buffer``).
        val_per_domain, test_per_domain: the first rows of each domain held out (never drawn).
        max_train_per_domain: training rows per domain and pass (None = all).
        max_length, truncation, separator, chat_template: the tokenisation (:func:`encode_rows`).
        allocation: ``"multinomial"`` or ``"proportional"`` (:func:`allocate_counts`).
        read_rows: records read and tokenised together (at most ``buffer_size``).
    """

    def __init__(
        self,
        open_stream: Callable[[], Chunks],
        domains: list[str],
        tokenizer: Any,
        *,
        pool_size: int,
        seed: int,
        buffer_size: int = 1024,
        val_per_domain: int = 0,
        test_per_domain: int = 0,
        max_train_per_domain: int | None = None,
        max_length: int = 128,
        truncation: str = "left",
        separator: str = "\n",
        chat_template: bool = True,
        allocation: str = "multinomial",
        read_rows: int = _READ_ROWS,
    ) -> None:
        if int(pool_size) != pool_size or pool_size < 1:
            raise DataError(f"pool_size must be a positive integer, got {pool_size!r}")
        if int(buffer_size) != buffer_size or buffer_size < 1:
            raise DataError(f"data.stream_buffer must be a positive integer, got {buffer_size!r}")
        if allocation not in _ALLOCATIONS:
            raise DataError(f"allocation={allocation!r} is unknown; use one of {list(_ALLOCATIONS)}")
        if not domains or len(set(domains)) != len(domains):
            raise DataError(f"domains must name each domain once, got {domains!r}")
        self._open_stream = open_stream
        self.domains = list(domains)
        self.num_domains = len(self.domains)
        self._index = {d: i for i, d in enumerate(self.domains)}
        self.tokenizer = tokenizer
        self.pool_size, self.seed, self.buffer_size = int(pool_size), int(seed), int(buffer_size)
        self.allocation = allocation
        self.held_out = (int(val_per_domain), int(test_per_domain))
        self.cap = None if max_train_per_domain is None else int(max_train_per_domain)
        self._settings = {
            "max_length": max_length,
            "truncation": truncation,
            "separator": separator,
            "chat_template": chat_template,
        }
        self._read_rows = max(1, min(int(read_rows), self.buffer_size))
        self._gen = torch.Generator().manual_seed(self.seed)
        zeros = [0] * self.num_domains
        self._buffers: list[list[_Row]] = [[] for _ in self.domains]
        self._in_buffer: list[set[int]] = [set() for _ in self.domains]
        self._pass, self._position, self._ended = 0, 0, False
        self._domain_rows = list(zeros)  # records of each domain read in this pass (the hold-out rule)
        # training rows read (all passes: the natural mixture), skipped (buffer full), dropped (tokenisation)
        self.train_read, self.skipped, self.dropped = list(zeros), list(zeros), list(zeros)
        self._pass_skipped, self._pass_dropped = list(zeros), list(zeros)
        self._iter: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._last: dict[int, _Row] = {}
        self._warned = False
        self.draws = 0

    @classmethod
    def from_config(
        cls, cfg: DataConfig, tokenizer: Any, *, pool_size: int, seed: int, allocation: str = "multinomial"
    ) -> StreamingSampler:
        """The sampler of ``cfg``'s stream (:func:`stream_records`), buffers and hold-out rule."""
        return cls(
            lambda: stream_records(cfg),
            list(cfg.domains or []),
            tokenizer,
            pool_size=pool_size,
            seed=seed,
            buffer_size=cfg.stream_buffer,
            val_per_domain=cfg.val_per_domain,
            test_per_domain=cfg.test_per_domain,
            max_train_per_domain=cfg.max_train_per_domain,
            allocation=allocation,
            **_settings(cfg),
        )

    shard = staticmethod(CandidateSampler.shard)

    # ---- properties ------------------------------------------------------------------------------

    @property
    def passes(self) -> int:
        """How many times the stream has been started again from its beginning."""
        return self._pass

    @property
    def epochs(self) -> list[int]:
        """Per domain, the passes started again (one stream: the same for every domain)."""
        return [self._pass] * self.num_domains

    @property
    def position(self) -> int:
        """Records of the stream read so far in the current pass."""
        return self._position

    @property
    def buffered(self) -> list[int]:
        """Rows in each domain's buffer now (each at most ``buffer_size``)."""
        return [len(b) for b in self._buffers]

    def buffer_positions(self, domain: int) -> list[int]:
        """The stream positions of the rows in a domain's buffer, in buffer order."""
        return [r.position for r in self._buffers[domain]]

    # ---- reading ---------------------------------------------------------------------------------

    def _records_from(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, record)`` of the stream from ``start`` on (a fresh opening, read up to ``start``)."""
        chunks = self._open_stream()
        pos = 0
        try:
            for chunk in chunks:
                for i in range(max(0, start - pos), len(chunk)):
                    yield pos + i, chunk[i]
                pos += len(chunk)
        finally:
            _close(chunks)
        if pos < start:
            raise DataError(
                f"the stream has {pos} rows, fewer than the {start} read before the checkpoint: the source changed; "
                "resume needs the same data"
            )

    def _train_domain(self, rec: dict[str, Any]) -> int | None:
        """The domain id of a training row (counting the record for the hold-out rule); None otherwise."""
        d = self._index.get(rec["domain"])
        if d is None:
            return None
        k = self._domain_rows[d]
        self._domain_rows[d] = k + 1
        held = sum(self.held_out)
        if k < held or (self.cap is not None and k >= held + self.cap):
            return None
        self.train_read[d] += 1
        return d

    def _tokenize(self, entries: list[tuple[int, int, dict[str, Any]]]) -> list[_Row | None]:
        """``(position, domain, record)`` entries tokenised as :func:`tokenize_records` does; None = dropped."""
        encoded = encode_rows([rec for _, _, rec in entries], self.tokenizer, **self._settings)
        out: list[_Row | None] = []
        for (pos, d, rec), enc in zip(entries, encoded):
            status, _answer = row_outcome(rec, enc)
            if status != KEPT:
                out.append(None)
                continue
            ids = torch.tensor(enc.ids, dtype=torch.long)
            labels = ids.clone()
            labels[: enc.prompt_len] = IGNORE_INDEX
            out.append(_Row(pos, d, ids, labels, _source_id(rec)))
        return out

    def _skip(self, d: int) -> None:
        self.skipped[d] += 1
        self._pass_skipped[d] += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "streaming: the buffer of domain %r is full (data.stream_buffer=%d) while other domains read on: "
                "its rows read meanwhile are skipped and counted (they come again on the next pass; each pass "
                "ends with the counts)",
                self.domains[d],
                self.buffer_size,
            )

    def _read_batch(self) -> bool:
        """Read (and tokenise) the next records of the pass into the buffers; False when the pass has ended."""
        if self._ended:
            return False
        if self._iter is None:
            self._iter = self._records_from(self._position)
        batch = list(itertools.islice(self._iter, self._read_rows))
        if not batch:
            self._end_pass()
            return False
        full = [len(b) >= self.buffer_size for b in self._buffers]  # buffers only grow while reading
        wanted = []
        for pos, rec in batch:
            d = self._train_domain(rec)
            if d is None or pos in self._in_buffer[d]:  # held out, another domain, or still buffered
                continue
            if full[d]:
                self._skip(d)
                continue
            wanted.append((pos, d, rec))
        for (_, d, _), row in zip(wanted, self._tokenize(wanted) if wanted else []):
            if row is None:
                self.dropped[d] += 1
                self._pass_dropped[d] += 1
            elif len(self._buffers[d]) >= self.buffer_size:
                self._skip(d)
            else:
                self._buffers[d].append(row)
                self._in_buffer[d].add(row.position)
        self._position = batch[-1][0] + 1
        return True

    def _end_pass(self) -> None:
        self._ended, self._iter = True, None
        named = {name: (self._pass_skipped[d], self._pass_dropped[d]) for d, name in enumerate(self.domains)}
        lost = {name: n for name, n in named.items() if any(n)}
        say = log.warning if lost else log.info
        say(
            "streaming: pass %d of the stream ended after %d rows; (skipped: buffer full, dropped: tokenisation) "
            "per domain: %s",
            self._pass + 1,
            self._position,
            lost or "none",
        )

    def _new_pass(self) -> None:
        zeros = [0] * self.num_domains
        self._pass, self._position, self._ended, self._iter = self._pass + 1, 0, False, None
        self._domain_rows, self._pass_skipped, self._pass_dropped = list(zeros), list(zeros), list(zeros)

    def _fill(self, d: int) -> None:
        """Read on until domain ``d``'s buffer is full or the pass has ended."""
        while len(self._buffers[d]) < self.buffer_size and self._read_batch():
            pass

    def _no_rows(self, d: int) -> str:
        val, test = self.held_out
        rows = self._domain_rows[d]
        if rows <= val + test:
            return (
                f"domain {self.domains[d]!r} has a positive weight but no training rows in the stream: its {rows} "
                f"rows are all held out (data.val_per_domain={val} + data.test_per_domain={test}); lower those, "
                "give the domain weight 0, or leave it out of data.domains"
            )
        return (
            f"domain {self.domains[d]!r} has a positive weight but tokenisation dropped every one of its training "
            f"rows (data.max_length={self._settings['max_length']}, data.truncation={self._settings['truncation']!r}); "
            "raise data.max_length, change data.truncation, or leave the domain out of data.domains"
        )

    # ---- drawing ---------------------------------------------------------------------------------

    def _pop(self, d: int, k: int) -> list[_Row]:
        """``k`` rows of domain ``d``'s buffer, in a seeded random order; they leave the buffer."""
        buf = self._buffers[d]
        picked = torch.randperm(len(buf), generator=self._gen)[:k].tolist()
        gone = set(picked)
        chosen = [buf[i] for i in picked]
        self._buffers[d] = [row for i, row in enumerate(buf) if i not in gone]
        for row in chosen:
            self._in_buffer[d].discard(row.position)
        return chosen

    def _take(self, d: int, count: int) -> list[_Row]:
        """``count`` rows of domain ``d``: its buffer topped up by reading on, a new pass when the stream ended."""
        out: list[_Row] = []
        pass_start = None  # len(out) when this call began a new pass
        while len(out) < count:
            self._fill(d)
            if self._buffers[d]:
                out.extend(self._pop(d, min(count - len(out), len(self._buffers[d]))))
                continue
            if pass_start == len(out):  # a whole pass gave this domain nothing
                raise DataError(self._no_rows(d))
            self._new_pass()
            pass_start = len(out)
        return out

    def _probabilities(self, weights: Any) -> torch.Tensor:
        """Normalised weights; ``None`` = the shares of the training rows read so far (at least a pool's worth)."""
        if weights is not None:
            return check_weights(weights, self.num_domains)
        while sum(self.train_read) < self.pool_size and self._read_batch():
            pass
        if not sum(self.train_read):
            raise DataError(
                f"the stream has no training rows of data.domains={self.domains} (all held out or none); "
                "lower data.val_per_domain / data.test_per_domain or check data.domains"
            )
        return check_weights(torch.tensor(self.train_read, dtype=torch.float64), self.num_domains)

    def allocate(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor[D]: pool slots per domain, as :meth:`CandidateSampler.allocate` gives them."""
        return allocate_counts(self._probabilities(weights), self.pool_size, self.allocation, self._gen)

    def draw(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor[pool_size]: the stream positions of the next candidate pool (see :meth:`collate`).

        Args:
            weights: domain weights (Tensor[D]); ``None`` = the shares of the training rows read so far.

        Raises:
            DataError: bad weights, or a domain with a positive weight that has no training rows.
        """
        counts = self.allocate(weights)
        rows: list[_Row] = []
        for d, c in enumerate(counts.tolist()):
            if c > 0:
                rows.extend(self._take(d, int(c)))
        order = torch.randperm(len(rows), generator=self._gen).tolist()
        rows = [rows[i] for i in order]
        self._last = {row.position: row for row in rows}
        self.draws += 1
        return torch.tensor([row.position for row in rows], dtype=torch.long)

    def _rows_of(self, ids: Any) -> list[_Row]:
        out = []
        for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist():
            row = self._last.get(i)
            if row is None:
                raise DataError(f"row {i} is not in the latest pool: a streaming sampler collates its latest draw only")
            out.append(row)
        return out

    def collate(self, ids: Any, pad_token_id: int | None) -> dict[str, torch.Tensor]:
        """The rows ``ids`` of the latest draw, padded as :meth:`TokenizedSplit.collate` pads (``index`` = ids)."""
        rows = self._rows_of(ids)
        split = TokenizedSplit(
            self.domains, [r.domain for r in rows], [r.input_ids for r in rows], [r.labels for r in rows]
        )
        batch = split.collate(torch.arange(len(rows)), pad_token_id)
        batch["index"] = torch.as_tensor(ids, dtype=torch.long).reshape(-1).clone()
        return batch

    def source_of(self, ids: Any) -> list[str]:
        """Where the rows ``ids`` of the latest draw came from (``selections.jsonl``'s ``sources``)."""
        return [r.source for r in self._rows_of(ids)]

    # ---- checkpointing ---------------------------------------------------------------------------

    def _checksum(self) -> str:
        digest = hashlib.sha256()
        for buf in self._buffers:
            for row in buf:
                digest.update(f"{row.position}:{row.domain}:{row.source}:".encode())
                digest.update(row.input_ids.numpy().tobytes())
                digest.update(row.labels.numpy().tobytes())
        return digest.hexdigest()[:24]

    def _settings_key(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "allocation": self.allocation,
            "domains": list(self.domains),
            "buffer_size": self.buffer_size,
            "held_out": [*self.held_out, -1 if self.cap is None else self.cap],
        }

    def state_dict(self) -> dict[str, Any]:
        """The stream position, the buffered positions, the counters and the generator state."""
        return {
            "version": _STATE_VERSION,
            "kind": "streaming",
            "seed": self.seed,
            **self._settings_key(),
            "generator": self._gen.get_state(),
            "pass": self._pass,
            "position": self._position,
            "ended": self._ended,
            "domain_rows": list(self._domain_rows),
            "buffers": [[row.position for row in buf] for buf in self._buffers],
            "checksum": self._checksum(),
            "train_read": list(self.train_read),
            "skipped": list(self.skipped),
            "dropped": list(self.dropped),
            "pass_skipped": list(self._pass_skipped),
            "pass_dropped": list(self._pass_dropped),
            "draws": self.draws,
        }

    def _reread(self, wanted: dict[int, int]) -> dict[int, _Row]:
        """The rows at the stream positions ``wanted`` (position -> domain id), read and tokenised again."""
        if not wanted:
            return {}
        last = max(wanted)
        entries = []
        records = self._records_from(0)
        try:
            for pos, rec in records:
                if pos in wanted:
                    entries.append((pos, wanted[pos], rec))
                if pos >= last:
                    break
        finally:
            _close(records)
        rows = self._tokenize(entries)
        changed = len(entries) != len(wanted) or any(
            row is None or rec["domain"] != self.domains[d] for (_, d, rec), row in zip(entries, rows)
        )
        if changed:
            raise DataError(
                "cannot resume: the stream's rows at the checkpoint's buffer positions are not those saved (the "
                "source or the tokenisation changed since the checkpoint); resume needs the same data"
            )
        return {row.position: row for row in rows if row is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the buffers are read again from the stream (module docstring).

        Raises:
            DataError: the state is not a streaming sampler's, its settings differ, or the stream changed.
        """
        if state.get("kind") != "streaming" or state.get("version") != _STATE_VERSION:
            raise DataError(
                f"cannot resume: the checkpoint's sampler state is not a streaming sampler's (version "
                f"{_STATE_VERSION}); was data.streaming changed since the checkpoint?"
            )
        for key, mine in self._settings_key().items():
            saved = list(state[key]) if isinstance(mine, list) else state[key]
            if saved != mine:
                raise DataError(
                    f"cannot resume: the saved streaming sampler has {key}={saved!r} but this one has {mine!r} "
                    "(the data or pool settings changed since the checkpoint)"
                )
        wanted = {int(pos): d for d, buf in enumerate(state["buffers"]) for pos in buf}
        rows = self._reread(wanted)
        self._buffers = [[rows[int(pos)] for pos in buf] for buf in state["buffers"]]
        self._in_buffer = [{row.position for row in buf} for buf in self._buffers]
        if self._checksum() != state["checksum"]:
            raise DataError(
                "cannot resume: the stream's buffered rows differ from the checkpoint's (the source or the "
                "tokenisation changed since the checkpoint); resume needs the same data"
            )
        self.seed = int(state["seed"])
        self._gen.set_state(state["generator"])
        self._pass, self._position, self._ended = int(state["pass"]), int(state["position"]), bool(state["ended"])
        self._domain_rows = [int(x) for x in state["domain_rows"]]
        self.train_read = [int(x) for x in state["train_read"]]
        self.skipped = [int(x) for x in state["skipped"]]
        self.dropped = [int(x) for x in state["dropped"]]
        self._pass_skipped = [int(x) for x in state["pass_skipped"]]
        self._pass_dropped = [int(x) for x in state["pass_dropped"]]
        self.draws = int(state["draws"])
        self._iter, self._last = None, {}
