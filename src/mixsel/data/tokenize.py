"""Tokenise normalised records into per-example tensors, and collate them into padded batches.

Conventions (those of Hugging Face causal LMs):

* ``labels`` are aligned with ``input_ids``; the model shifts them, so position ``t`` of
  ``labels`` is predicted from positions ``< t`` and position 0 is never a target.
* ``-100`` marks positions without loss: the prompt of instruction data and padding.
* A *target token* is a position ``t >= 1`` with ``labels[t] != -100``.

Plain text (``text``): ``[bos] + tokens(text) + [eos]``, truncated on the right to ``max_length``
(so the end-of-sequence token is kept only when the whole document fits), labels = input ids.

Instruction data (``prompt`` + ``response``, or a conversation: ``messages`` + ``response``) is
first written as a prompt text and a response text:

* with a chat template (the tokenizer has ``chat_template`` set and ``chat_template=True``): the
  prompt is the template's rendering of the turns before the response with the generation prompt
  (``apply_chat_template(..., add_generation_prompt=True)``), the response is what the rendering of
  the whole conversation adds to it (the answer and the template's end-of-turn tokens); no ``eos``
  is appended, the template ends the turn;
* without one: the prompt is the prompt text (a conversation: its turns' contents joined by
  ``separator``) followed by ``separator`` (``"\\n"`` by default; ``""`` joins them directly, as
  mixsel did before), the response is the response text, and ``eos`` is appended.

The two texts are tokenised *separately* and concatenated, ``[bos] + prompt + response [+ eos]``,
so the prompt tokens are exactly those a model is given at generation time. Prompt positions get
label -100. An example longer than ``max_length`` is handled by ``truncation``:

* ``"left"`` (default): keep the whole response with its end token and the *last* tokens of the
  prompt (at least one, when there is no ``bos``, so that every response token is a target); if
  the response alone does not fit, keep that one prompt token and cut the response on the right.
* ``"drop"``: drop the example.
* ``"right"``: cut the response on the right; if the prompt alone fills ``max_length``, keep its
  last tokens and one response token (mixsel's behaviour before ``truncation`` existed).

An instruction example whose response (or its end token) was cut keeps training on what is left,
but its answer is set to ``None`` so it is never scored by exact match. Examples left with zero
target tokens are dropped, with a warning that counts them. :attr:`TokenizedSplit.counts` records,
per domain, how many examples were cut, lost part of their response, or were dropped, and
:attr:`TokenizedSplit.sources` where each kept example came from (:meth:`TokenizedSplit.source_of`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mixsel.answers import reference_answer
from mixsel.errors import DataError

if TYPE_CHECKING:
    from mixsel.data.summary import DataSummary

__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "DomainCounts",
    "Mixture",
    "StoreColumn",
    "TokenizedSplit",
    "format_instructions",
    "tokenize_records",
    "uses_chat_template",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CHUNK = 2048
_PROGRESS_MIN = 20_000
#: Values of ``data.truncation`` (see the module docstring).
TRUNCATION_MODES = ("left", "drop", "right")


@dataclass
class DomainCounts:
    """What tokenisation did to the rows of one domain in one split."""

    # examples kept in the split (trained on, or evaluated)
    rows: int = 0
    # of the kept examples, prompt/response or conversation rows (the others are plain text)
    instruction: int = 0
    # rows longer than data.max_length: cut, or dropped under truncation="drop"
    truncated: int = 0
    # instruction rows that lost part of their response (or its end token), or were dropped for length
    response_cut: int = 0
    # rows removed: too long under truncation="drop", or left without a target token
    dropped: int = 0
    # kept rows with a reference answer and a whole response: the prompts exact match may score
    scored: int = 0
    # the longest response of a scored row, in tokens (without the eos that mixsel appends)
    response_tokens_max: int = 0

    def add(self, other: DomainCounts) -> DomainCounts:
        """The counts of both (maxima for ``response_tokens_max``)."""
        return DomainCounts(
            rows=self.rows + other.rows,
            instruction=self.instruction + other.instruction,
            truncated=self.truncated + other.truncated,
            response_cut=self.response_cut + other.response_cut,
            dropped=self.dropped + other.dropped,
            scored=self.scored + other.scored,
            response_tokens_max=max(self.response_tokens_max, other.response_tokens_max),
        )


class StoreColumn(Sequence[Any]):
    """One column of a prepared corpus (:mod:`mixsel.data.prepared`) at a split's rows, read from the
    memory-mapped Arrow table when accessed, so a split never holds its rows as Python objects.

    Items are LongTensors for the token columns (``input_ids``, ``labels``) and plain values otherwise.
    """

    def __init__(self, table: Any, column: str, rows: Any, *, tensors: bool = False, dataset: Any = None) -> None:
        import numpy as np

        self.table = table
        # the ``datasets.Dataset`` over ``table`` (for views that stay memory-mapped), when there is one
        self.dataset = dataset
        self.column = column
        self.rows = np.asarray(rows, dtype=np.int64)
        self.tensors = tensors
        self._starts: Any = None  # the first row of each Arrow chunk of the column, once needed

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def take(self, positions: Sequence[int] | Any) -> list[Any]:
        """The items at ``positions`` (indices into this split), in order: one read of the Arrow table."""
        import numpy as np
        import pyarrow as pa

        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        column = self.table.column(self.column)
        if column.num_chunks == 1:
            values = column.chunk(0).take(pa.array(rows)).to_pylist()
        else:  # ChunkedArray.take concatenates every chunk first: a copy of the whole column per call
            if self._starts is None:
                self._starts = np.cumsum([0] + [len(c) for c in column.chunks])
            chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
            values = [None] * len(rows)
            for c in np.unique(chunk_of).tolist():
                at = np.flatnonzero(chunk_of == c)
                got = column.chunk(c).take(pa.array(rows[at] - self._starts[c])).to_pylist()
                for i, value in zip(at.tolist(), got):
                    values[i] = value
        if self.tensors:
            return [torch.tensor(v, dtype=torch.long) for v in values]
        return values

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        return self.take([int(i) % n])[0]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StoreColumn, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Any:
        for start in range(0, len(self), 4096):
            yield from self.take(range(start, min(start + 4096, len(self))))


@dataclass
class TokenizedSplit:
    """One split (train, validation or test) of a multi-domain dataset, tokenised.

    Attributes:
        domains: domain names; domain id ``d`` is ``domains[d]``.
        domain_ids: LongTensor[N], the domain id of each example.
        input_ids: N LongTensors of varying length (no padding).
        labels: N LongTensors aligned with ``input_ids``; -100 on prompt tokens.
        prompts: the prompt text of each instruction example as the model is given it (chat
            template or separator applied; ``None`` for plain text).
        answers: the reference answer of each example (its ``answer``, or the one its response
            states, see :func:`mixsel.answers.reference_answer`), or ``None``: also ``None`` when
            the response was cut to fit ``max_length``, so such a prompt is never scored.
        counts: per domain name, what tokenisation did (:class:`DomainCounts`); empty for splits
            built by hand.
        sources: the source id of each example, where it came from in the data (a record's
            ``source``, see ``docs/data.md``: ``"<file>:<line>"`` for JSONL, ``"<file>:<row>"`` for
            Parquet / CSV / JSON arrays, ``"<dataset>[/<config>]:<split>:<index>"`` for a hub
            dataset); ``""`` where unknown. Left empty, it becomes ``[""] * N``.
        targets: LongTensor[N] of target tokens per example, when known in advance.

    The sequences may be lists or :class:`StoreColumn` views of a prepared corpus (what
    :func:`mixsel.data.load_mixture` returns): both index and iterate alike.
    """

    domains: list[str]
    domain_ids: torch.Tensor
    input_ids: Sequence[torch.Tensor]
    labels: Sequence[torch.Tensor]
    prompts: Sequence[str | None] = field(default_factory=list)
    answers: Sequence[str | None] = field(default_factory=list)
    counts: dict[str, DomainCounts] = field(default_factory=dict)
    sources: Sequence[str] = field(default_factory=list)
    # target tokens per example when known in advance (a prepared corpus); None = counted from labels
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        self.domain_ids = torch.as_tensor(self.domain_ids, dtype=torch.long).reshape(-1)
        if not self.prompts:
            self.prompts = [None] * n
        if not self.answers:
            self.answers = [None] * n
        if not self.sources:
            self.sources = [""] * n
        sizes = {
            "domain_ids": int(self.domain_ids.numel()),
            "labels": len(self.labels),
            "prompts": len(self.prompts),
            "answers": len(self.answers),
            "sources": len(self.sources),
        }
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise DataError(f"TokenizedSplit fields disagree in length: input_ids has {n}, but {bad}")
        if n and (int(self.domain_ids.min()) < 0 or int(self.domain_ids.max()) >= len(self.domains)):
            raise DataError(f"domain_ids must lie in [0, {len(self.domains)}) for domains {self.domains}")

    def __len__(self) -> int:
        return len(self.input_ids)

    def domain_counts(self) -> torch.Tensor:
        """LongTensor[D]: the number of examples of each domain."""
        return torch.bincount(self.domain_ids, minlength=len(self.domains))

    def indices_of(self, domain_id: int) -> torch.Tensor:
        """LongTensor of the (ascending) indices of the examples of domain ``domain_id``."""
        if not 0 <= int(domain_id) < len(self.domains):
            raise DataError(f"domain_id={domain_id} is out of range for {len(self.domains)} domains {self.domains}")
        return torch.nonzero(self.domain_ids == int(domain_id), as_tuple=False).reshape(-1)

    def source_of(self, indices: Sequence[int] | torch.Tensor) -> list[str]:
        """The source ids of the examples at ``indices`` (repeats allowed, order kept).

        Args:
            indices: example indices into this split, as :meth:`collate` takes them.

        Returns:
            One id per index (see :attr:`sources`); ``""`` for an example whose source is unknown
            (a split built by hand, or records without a ``source``).

        Raises:
            ValueError: an index outside ``[0, len(self))``.
        """
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        n = len(self)
        bad = [i for i in index if not 0 <= i < n]
        if bad:
            raise DataError(f"source_of indices must lie in [0, {n}); got {bad[:5]}")
        if isinstance(self.sources, StoreColumn):
            return [str(s or "") for s in self.sources.take(index)]
        return [self.sources[i] for i in index]

    def num_targets(self) -> torch.Tensor:
        """LongTensor[N]: target tokens per example (positions ``t >= 1`` with label != -100)."""
        if self.targets is not None:
            return self.targets
        return torch.tensor([int((lab[1:] != IGNORE_INDEX).sum()) for lab in self.labels], dtype=torch.long)

    def collate(
        self,
        indices: Sequence[int] | torch.Tensor,
        pad_token_id: int,
        *,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """A right-padded batch of the examples at ``indices`` (repeats allowed, order kept).

        Returns:
            ``input_ids`` LongTensor[B, L] (``pad_token_id`` on padding), ``attention_mask``
            LongTensor[B, L] (1 on real tokens), ``labels`` LongTensor[B, L] (-100 on prompt and
            padding), ``domain_ids`` LongTensor[B] and ``index`` LongTensor[B] (the indices). ``L``
            is the longest example, rounded up to a multiple of ``pad_to_multiple_of`` if given.
        """
        if pad_token_id is None:
            raise DataError(
                "pad_token_id is None; give the tokenizer a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise DataError(f"collate indices must lie in [0, {n}); got min {int(index.min())}, max {int(index.max())}")
        if isinstance(self.input_ids, StoreColumn) and isinstance(self.labels, StoreColumn):
            seqs, labs = self.input_ids.take(index.numpy()), self.labels.take(index.numpy())
        else:
            seqs = [self.input_ids[i] for i in index.tolist()]
            labs = [self.labels[i] for i in index.tolist()]
        length = max((s.numel() for s in seqs), default=0)
        if pad_to_multiple_of:
            if pad_to_multiple_of < 1:
                raise DataError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        batch = len(seqs)
        input_ids = torch.full((batch, length), int(pad_token_id), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(seqs, labs)):
            input_ids[row, : seq.numel()] = seq
            labels[row, : lab.numel()] = lab
            attention_mask[row, : seq.numel()] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "domain_ids": self.domain_ids[index],
            "index": index,
        }


@dataclass
class Mixture:
    """The tokenised train / validation / test splits of a multi-domain dataset (same domain ids).

    ``summary`` (a :class:`mixsel.data.summary.DataSummary`) is set by :func:`mixsel.data.build.load_mixture`:
    the source, the tokenisation settings and the per-domain counts of every split.
    """

    domains: list[str]
    train: TokenizedSplit
    validation: TokenizedSplit
    test: TokenizedSplit
    summary: DataSummary | None = None
    # the prepared store the splits are views of (mixsel.data.prepared.PreparedCorpus); None for rows in memory
    corpus: Any = None

    def __post_init__(self) -> None:
        for name in ("train", "validation", "test"):
            if list(getattr(self, name).domains) != list(self.domains):
                raise DataError(
                    f"the {name} split's domains {getattr(self, name).domains} differ from the mixture's {self.domains}"
                )


def _special_id(tokenizer: Any, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        raise DataError(
            f"add_{which}=True but the tokenizer has no {which} token; set tokenizer.{which}_token or pass "
            f"add_{which}=False"
        )
    return int(token_id)


def _encode(tokenizer: Any, texts: list[str], *, max_tokens: int | None, progress: bool, desc: str) -> list[list[int]]:
    """Token ids of ``texts`` (no special tokens) through the tokenizer's batch API, in chunks."""
    out: list[list[int]] = []
    if not texts:
        return out
    kwargs: dict[str, Any] = {"add_special_tokens": False, "return_attention_mask": False}
    if max_tokens is not None:
        kwargs.update(truncation=True, max_length=max_tokens)
    starts = range(0, len(texts), _CHUNK)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk")
    for start in starts:
        enc = tokenizer(texts[start : start + _CHUNK], **kwargs)
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def uses_chat_template(tokenizer: Any, chat_template: bool = True) -> bool:
    """Whether instruction rows are written with the tokenizer's chat template: it has one and it is wanted."""
    return bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))


def _turns(record: dict[str, Any]) -> list[dict[str, str]]:
    """The turns before the response: a conversation's ``messages``, or one user turn holding ``prompt``."""
    if "messages" in record:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
    prompt = str(record.get("prompt", ""))
    return [{"role": "user", "content": prompt}] if prompt else []


def format_instructions(
    records: Sequence[dict[str, Any]], tokenizer: Any, *, separator: str = "\n", chat_template: bool = True
) -> tuple[list[str], list[str]]:
    """The prompt texts and response texts of instruction records (see the module docstring).

    Args:
        records: records with ``response`` and either ``prompt`` or ``messages`` (the earlier turns).
        tokenizer: the tokenizer whose ``chat_template`` is used, if it has one.
        separator: joins prompt and response (and a conversation's turns) without a chat template.
        chat_template: use the tokenizer's chat template when it has one.

    Raises:
        ValueError: the chat template fails on a conversation, or renders the prompt so that it is
            not a prefix of the whole conversation (the response could not be masked).
    """
    if not uses_chat_template(tokenizer, chat_template):
        prompts = []
        for rec in records:
            text = separator.join(t["content"] for t in _turns(rec)) if "messages" in rec else str(rec["prompt"])
            prompts.append(text + separator if text else "")
        return prompts, [str(rec["response"]) for rec in records]
    prompts, responses = [], []
    for i, rec in enumerate(records):
        turns = _turns(rec)
        answer = {"role": "assistant", "content": str(rec["response"])}
        try:
            prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            whole = tokenizer.apply_chat_template([*turns, answer], tokenize=False)
        except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
            raise DataError(
                f"the tokenizer's chat template fails on record {i} (domain {rec.get('domain')!r}): {err}; fix the "
                "conversation or set data.chat_template=false to join prompt and response with data.separator"
            ) from None
        if not whole.startswith(prompt):
            raise DataError(
                f"the chat template renders record {i}'s prompt (with the generation prompt) differently from the "
                "start of the whole conversation, so the response cannot be masked; set data.chat_template=false"
            )
        prompts.append(prompt)
        responses.append(whole[len(prompt) :])
    return prompts, responses


def _instruction_ids(
    prompt: list[int], response: list[int], bos: list[int], eos: list[int], max_length: int, truncation: str
) -> tuple[list[int] | None, int, bool]:
    """``(input_ids or None if dropped, prompt_length, response_cut)`` under the truncation rule."""
    full_response = response + eos
    budget = max_length - len(bos)
    if len(prompt) + len(full_response) <= budget:
        return bos + prompt + full_response, len(bos) + len(prompt), False
    if truncation == "drop":
        return None, 0, True
    if truncation == "left":
        context = 0 if bos or not prompt else 1  # a prompt token before the response makes all of it targets
        keep = max(budget - len(full_response), context)
        kept_prompt = prompt[len(prompt) - keep :] if keep else []
        kept_response = full_response[: budget - len(kept_prompt)]
        return bos + kept_prompt + kept_response, len(bos) + len(kept_prompt), len(kept_response) < len(full_response)
    if len(prompt) < budget:  # "right": the prompt fits, so cut the response on the right
        return bos + prompt + full_response[: budget - len(prompt)], len(bos) + len(prompt), True
    keep = budget - 1  # the prompt fills the budget: keep its last tokens and one response token
    kept_prompt = prompt[len(prompt) - keep :] if keep > 0 else []
    return bos + kept_prompt + full_response[:1], len(bos) + len(kept_prompt), True


def _is_instruction(record: dict[str, Any]) -> bool:
    return "response" in record and ("prompt" in record or "messages" in record)


@dataclass
class _Encoded:
    """One record after tokenisation and truncation, before it becomes tensors."""

    # the token ids kept; None when the row was dropped for length
    ids: list[int] | None
    # leading positions that are prompt (label -100)
    prompt_len: int = 0
    # the row was longer than max_length
    truncated: bool = False
    # an instruction row lost part of its response (or its end token), or was dropped for length
    response_cut: bool = False
    # response tokens before truncation (at most max_length + 1), without the appended eos
    response_tokens: int = 0
    # the prompt text as given to the model (instruction rows only)
    prompt: str | None = None


def _encode_texts(
    texts: list[str], tokenizer: Any, bos: list[int], eos: list[int], max_length: int, progress: bool
) -> list[_Encoded]:
    """Plain texts, cut on the right (one token more than fits is read, to see that a text is too long)."""
    out = []
    for toks in _encode(tokenizer, texts, max_tokens=max_length - len(bos) + 1, progress=progress, desc="texts"):
        whole = bos + toks + eos
        out.append(_Encoded(whole[:max_length], truncated=len(whole) > max_length))
    return out


def _encode_instructions(
    records: list[dict[str, Any]],
    tokenizer: Any,
    bos: list[int],
    eos: list[int],
    *,
    max_length: int,
    truncation: str,
    separator: str,
    chat_template: bool,
    progress: bool,
) -> list[_Encoded]:
    """Instruction records formatted, tokenised (prompt and response apart) and truncated."""
    prompt_texts, response_texts = format_instructions(
        records, tokenizer, separator=separator, chat_template=chat_template
    )
    prompts = _encode(tokenizer, prompt_texts, max_tokens=None, progress=progress, desc="prompts")
    responses = _encode(tokenizer, response_texts, max_tokens=max_length + 1, progress=progress, desc="responses")
    out = []
    for text, p_ids, r_ids in zip(prompt_texts, prompts, responses):
        ids, prompt_len, cut = _instruction_ids(p_ids, r_ids, bos, eos, max_length, truncation)
        too_long = len(bos) + len(p_ids) + len(r_ids) + len(eos) > max_length
        out.append(_Encoded(ids, prompt_len, too_long, cut, len(r_ids), text))
    return out


def _answer(record: dict[str, Any], enc: _Encoded) -> str | None:
    """The reference answer of an instruction row, or None when there is none or it cannot fit."""
    if enc.response_cut:
        return None  # the reference cannot fit max_length: never scored
    answer = record.get("answer")
    if answer is None:
        answer = reference_answer(str(record["response"]))
    return None if answer is None else str(answer)


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    domains: Sequence[str],
    max_length: int,
    add_eos: bool = True,
    add_bos: bool = False,
    truncation: str = "left",
    separator: str = "\n",
    chat_template: bool = True,
    progress: bool | None = None,
) -> TokenizedSplit:
    """Tokenise normalised records (see :mod:`mixsel.data.loading`) with a Hugging Face tokenizer.

    The one tokenisation of mixsel: ``mixsel train`` (through :func:`mixsel.data.build.load_mixture`)
    and the Hugging Face route (:func:`mixsel.data.sft.sft_datasets`) both call it.

    Args:
        records: dicts with ``domain`` and either ``text``, or ``prompt`` + ``response``, or
            ``messages`` (the turns before the response) + ``response``; optionally ``answer``, and
            ``source`` (where the row came from, kept in :attr:`TokenizedSplit.sources`).
        tokenizer: a ``transformers`` tokenizer (fast ones are much quicker: the batch API is used).
        domains: the domain names in id order; every record's domain must be among them.
        max_length: the longest sequence kept, special tokens included (>= 2).
        add_eos: append ``tokenizer.eos_token_id`` to each text / response (not after a chat
            template's response, which ends the turn itself).
        add_bos: prepend ``tokenizer.bos_token_id`` to each example.
        truncation: ``"left"``, ``"drop"`` or ``"right"``: what happens to instruction examples
            longer than ``max_length`` (module docstring).
        separator: joins prompt and response when no chat template is used.
        chat_template: write instruction examples with the tokenizer's chat template when it has one.
        progress: show a tqdm bar (default: for more than 20,000 records).

    Returns:
        A :class:`TokenizedSplit` in record order, without the dropped examples, with
        :attr:`TokenizedSplit.counts` filled in for every domain and :attr:`TokenizedSplit.sources`
        holding each kept record's ``source`` (``""`` without one).

    Raises:
        ValueError: a record of an unknown domain or without text / prompt+response, an unknown
            ``truncation``, a missing special token, or ``max_length < 2``.
    """
    domain_id = _check_settings(max_length, truncation, domains)
    domains = list(domains)
    if progress is None:
        progress = len(records) > _PROGRESS_MIN
    _partition(records, domain_id, domains)  # checks every record's domain and kind
    encoded = encode_rows(
        records,
        tokenizer,
        max_length=max_length,
        truncation=truncation,
        separator=separator,
        chat_template=chat_template,
        add_eos=add_eos,
        add_bos=add_bos,
        progress=progress,
    )
    split, no_target = _assemble(records, encoded, domains, domain_id)
    if no_target:
        _warn_no_target(no_target, len(records), max_length)
    return split


def encode_rows(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "left",
    separator: str = "\n",
    chat_template: bool = True,
    add_eos: bool = True,
    add_bos: bool = False,
    progress: bool = False,
) -> list[_Encoded]:
    """Every record tokenised and truncated, in record order: the one tokenisation of mixsel.

    :func:`tokenize_records` and the prepared store (:mod:`mixsel.data.prepared`, one batch of
    ``Dataset.map`` at a time) both call it; :func:`row_outcome` then says what becomes of each row.
    Arguments as for :func:`tokenize_records`; records must be of known kinds (see :func:`_partition`).
    """
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    eos = [_special_id(tokenizer, "eos")] if add_eos else []
    plain_rows = [i for i, rec in enumerate(records) if not _is_instruction(rec)]
    instr_rows = [i for i, rec in enumerate(records) if _is_instruction(rec)]
    return _encode_records(
        records,
        plain_rows,
        instr_rows,
        tokenizer,
        bos,
        [] if uses_chat_template(tokenizer, chat_template) else eos,  # a chat template ends the turn itself
        eos,
        max_length=max_length,
        truncation=truncation,
        separator=separator,
        chat_template=chat_template,
        progress=progress,
    )


#: What becomes of a tokenised row (:func:`row_outcome`): kept, dropped for length, dropped without a target.
KEPT, TOO_LONG, NO_TARGET = 0, 1, 2


def row_outcome(record: dict[str, Any], enc: _Encoded) -> tuple[int, str | None]:
    """``(status, answer)`` of a tokenised row: :data:`KEPT`, :data:`TOO_LONG` (``truncation="drop"``)
    or :data:`NO_TARGET` (no target token left), and its reference answer (``None`` when the row is not
    scored: plain text keeps its ``answer`` column but has no prompt to score)."""
    if enc.ids is None:
        return TOO_LONG, None
    if len(enc.ids) - max(enc.prompt_len, 1) <= 0:  # targets are t >= max(1, prompt_len)
        return NO_TARGET, None
    if enc.prompt is None:
        return KEPT, None if record.get("answer") is None else str(record["answer"])
    return KEPT, _answer(record, enc)


def _check_settings(max_length: int, truncation: str, domains: Sequence[str]) -> dict[str, int]:
    """Check the settings of :func:`tokenize_records`.

    Args:
        max_length: the longest sequence kept (at least 2).
        truncation: one of :data:`TRUNCATION_MODES`.
        domains: the domain names in id order, each once.

    Returns:
        The domain id of each domain name.

    Raises:
        ValueError: ``max_length < 2``, an unknown ``truncation``, or a repeated domain name.
    """
    if int(max_length) < 2:
        raise DataError(f"data.max_length must be at least 2 (one context and one target token), got {max_length}")
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation={truncation!r} is not one of {', '.join(TRUNCATION_MODES)}; pick one")
    domains = list(domains)
    domain_id = {d: i for i, d in enumerate(domains)}
    if len(domain_id) != len(domains):
        raise DataError(f"domains {domains} repeat a name; list each domain once")
    return domain_id


def _partition(
    records: Sequence[dict[str, Any]], domain_id: dict[str, int], domains: list[str]
) -> tuple[list[int], list[int]]:
    """The indices of the plain-text records and of the instruction records.

    Args:
        records: normalised records.
        domain_id: the domain id of each known domain name.
        domains: the domain names in id order (for the error message).

    Returns:
        ``(plain_rows, instr_rows)``, each ascending.

    Raises:
        ValueError: a record of an unknown domain, or one with neither text nor prompt + response.
    """
    plain_rows, instr_rows = [], []
    for i, rec in enumerate(records):
        if rec.get("domain") not in domain_id:
            raise DataError(
                f"record {i} has domain {rec.get('domain')!r}, which is not among domains={domains}; "
                "filter the records with select_domains or add the domain"
            )
        if _is_instruction(rec):
            instr_rows.append(i)
        elif "text" in rec:
            plain_rows.append(i)
        else:
            raise DataError(
                f"record {i} (domain {rec['domain']!r}) has neither 'text' nor 'prompt' + 'response' (or "
                f"'messages' + 'response'); its keys are {sorted(rec)}"
            )
    return plain_rows, instr_rows


def _encode_records(
    records: Sequence[dict[str, Any]],
    plain_rows: list[int],
    instr_rows: list[int],
    tokenizer: Any,
    bos: list[int],
    response_eos: list[int],
    text_eos: list[int],
    *,
    max_length: int,
    truncation: str,
    separator: str,
    chat_template: bool,
    progress: bool,
) -> list[_Encoded]:
    """Every record tokenised and truncated, in record order.

    Args:
        records: normalised records.
        plain_rows: the indices of the plain-text records.
        instr_rows: the indices of the instruction records.
        tokenizer: the tokenizer.
        bos: the token put before each example (``[]`` for none).
        response_eos: the token put after each response (``[]`` for none, or with a chat template).
        text_eos: the token put after each plain text (``[]`` for none).
        max_length: the longest sequence kept.
        truncation: what happens to instruction rows that are too long.
        separator: joins prompt and response without a chat template.
        chat_template: use the tokenizer's chat template when it has one.
        progress: show progress bars.

    Returns:
        One :class:`_Encoded` per record.
    """
    encoded: list[_Encoded] = [_Encoded(None)] * len(records)
    texts = _encode_texts([str(records[i]["text"]) for i in plain_rows], tokenizer, bos, text_eos, max_length, progress)
    instructions = _encode_instructions(
        [records[i] for i in instr_rows],
        tokenizer,
        bos,
        response_eos,
        max_length=max_length,
        truncation=truncation,
        separator=separator,
        chat_template=chat_template,
        progress=progress,
    )
    for i, enc in [*zip(plain_rows, texts), *zip(instr_rows, instructions)]:
        encoded[i] = enc
    return encoded


def _source_id(record: dict[str, Any]) -> str:
    """The record's ``source`` as a string; ``""`` when it has none."""
    source = record.get("source")
    return "" if source is None else str(source)


def _assemble(
    records: Sequence[dict[str, Any]], encoded: list[_Encoded], domains: list[str], domain_id: dict[str, int]
) -> tuple[TokenizedSplit, int]:
    """The tensors, prompts, answers, sources and counts of the kept records.

    Args:
        records: normalised records.
        encoded: their tokenisation, in the same order.
        domains: the domain names in id order.
        domain_id: the domain id of each domain name.

    Returns:
        ``(split, no_target)``: the :class:`TokenizedSplit` of the records kept, and how many were
        dropped for having no target token (those dropped for length not included).
    """
    counts = {d: DomainCounts() for d in domains}
    input_ids, labels, dom, prompt_text, answers, sources = [], [], [], [], [], []
    no_target = 0
    for rec, enc in zip(records, encoded):
        c = counts[rec["domain"]]
        c.truncated += enc.truncated
        c.response_cut += enc.response_cut
        status, answer = row_outcome(rec, enc)
        if status != KEPT:
            no_target += status == NO_TARGET
            c.dropped += 1
            continue
        seq = torch.tensor(enc.ids, dtype=torch.long)
        lab = seq.clone()
        lab[: enc.prompt_len] = IGNORE_INDEX
        input_ids.append(seq)
        labels.append(lab)
        dom.append(domain_id[rec["domain"]])
        prompt_text.append(enc.prompt)
        sources.append(_source_id(rec))
        answers.append(answer)
        c.rows += 1
        if enc.prompt is None:  # plain text: an answer column is kept, but never scored (no prompt)
            continue
        c.instruction += 1
        if answer is not None:
            c.scored += 1
            c.response_tokens_max = max(c.response_tokens_max, enc.response_tokens)
    split = TokenizedSplit(
        domains=domains,
        domain_ids=torch.tensor(dom, dtype=torch.long),
        input_ids=input_ids,
        labels=labels,
        prompts=prompt_text,
        answers=answers,
        counts=counts,
        sources=sources,
    )
    return split, no_target


def _warn_no_target(no_target: int, total: int, max_length: int) -> None:
    """Warn (and log) that ``no_target`` of ``total`` examples were dropped without a target token.

    Called by :func:`tokenize_records` only: the warning is attributed to its caller.
    """
    message = (
        f"dropped {no_target} of {total} examples with no target token after tokenisation and "
        f"truncation to max_length={max_length} (empty text, or a one-token sequence)"
    )
    warnings.warn(message, stacklevel=3)
    log.warning(message)
