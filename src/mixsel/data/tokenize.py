"""Tokenise normalised records into per-example tensors, and collate them into padded batches.

Conventions (those of Hugging Face causal LMs):

* ``labels`` are aligned with ``input_ids``; the model shifts them, so position ``t`` of
  ``labels`` is predicted from positions ``< t`` and position 0 is never a target.
* ``-100`` marks positions without loss: the prompt of instruction data and padding.
* A *target token* is a position ``t >= 1`` with ``labels[t] != -100``.

Plain text (``text``): ``[bos] + tokens(text) + [eos]``, truncated on the right to ``max_length``
(so the end-of-sequence token is kept only when the whole document fits), labels = input ids.

Instruction data (``prompt`` + ``response``): the prompt and the response are tokenised
*separately* and concatenated, ``[bos] + tokens(prompt) + tokens(response) + [eos]``, so the prompt
tokens are exactly those a model is given at generation time. Prompt positions get label -100. If
the example is longer than ``max_length``, the response (with its eos) is truncated on the right;
if the prompt alone already fills ``max_length``, the prompt is truncated *from the left* (keeping
``bos``) so that at least one response token remains a target.

Examples left with zero target tokens are dropped, with a warning that counts them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "Mixture", "TokenizedSplit", "tokenize_records"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CHUNK = 2048
_PROGRESS_MIN = 20_000


@dataclass
class TokenizedSplit:
    """One split (train, validation or test) of a multi-domain dataset, tokenised.

    Attributes:
        domains: domain names; domain id ``d`` is ``domains[d]``.
        domain_ids: LongTensor[N], the domain id of each example.
        input_ids: N LongTensors of varying length (no padding).
        labels: N LongTensors aligned with ``input_ids``; -100 on prompt tokens.
        prompts: the prompt string of each instruction example (``None`` for plain text), for
            generation-based evaluation.
        answers: the checkable answer of each example, or ``None``.
    """

    domains: list[str]
    domain_ids: torch.Tensor
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    prompts: list[str | None] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        self.domain_ids = torch.as_tensor(self.domain_ids, dtype=torch.long).reshape(-1)
        if not self.prompts:
            self.prompts = [None] * n
        if not self.answers:
            self.answers = [None] * n
        sizes = {
            "domain_ids": int(self.domain_ids.numel()),
            "labels": len(self.labels),
            "prompts": len(self.prompts),
            "answers": len(self.answers),
        }
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise ValueError(f"TokenizedSplit fields disagree in length: input_ids has {n}, but {bad}")
        if n and (int(self.domain_ids.min()) < 0 or int(self.domain_ids.max()) >= len(self.domains)):
            raise ValueError(f"domain_ids must lie in [0, {len(self.domains)}) for domains {self.domains}")

    def __len__(self) -> int:
        return len(self.input_ids)

    def domain_counts(self) -> torch.Tensor:
        """LongTensor[D]: the number of examples of each domain."""
        return torch.bincount(self.domain_ids, minlength=len(self.domains))

    def indices_of(self, domain_id: int) -> torch.Tensor:
        """LongTensor of the (ascending) indices of the examples of domain ``domain_id``."""
        if not 0 <= int(domain_id) < len(self.domains):
            raise ValueError(f"domain_id={domain_id} is out of range for {len(self.domains)} domains {self.domains}")
        return torch.nonzero(self.domain_ids == int(domain_id), as_tuple=False).reshape(-1)

    def num_targets(self) -> torch.Tensor:
        """LongTensor[N]: target tokens per example (positions ``t >= 1`` with label != -100)."""
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
            raise ValueError(
                "pad_token_id is None; give the tokenizer a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(
                f"collate indices must lie in [0, {n}); got min {int(index.min())}, max {int(index.max())}"
            )
        seqs = [self.input_ids[i] for i in index.tolist()]
        labs = [self.labels[i] for i in index.tolist()]
        length = max((s.numel() for s in seqs), default=0)
        if pad_to_multiple_of:
            if pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
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
    """The tokenised train / validation / test splits of a multi-domain dataset (same domain ids)."""

    domains: list[str]
    train: TokenizedSplit
    validation: TokenizedSplit
    test: TokenizedSplit

    def __post_init__(self) -> None:
        for name in ("train", "validation", "test"):
            if list(getattr(self, name).domains) != list(self.domains):
                raise ValueError(
                    f"the {name} split's domains {getattr(self, name).domains} differ from the mixture's {self.domains}"
                )


def _special_id(tokenizer: Any, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        raise ValueError(
            f"add_{which}=True but the tokenizer has no {which} token; set tokenizer.{which}_token or pass "
            f"add_{which}=False"
        )
    return int(token_id)


def _encode(tokenizer: Any, texts: list[str], *, max_tokens: int | None, progress: bool, desc: str) -> list[list[int]]:
    """Token ids of ``texts`` (no special tokens) through the tokenizer's batch API, in chunks."""
    out: list[list[int]] = []
    if not texts:
        return out
    kwargs: dict[str, Any] = {"add_special_tokens": False}
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


def _instruction_ids(
    prompt: list[int], response: list[int], bos: list[int], eos: list[int], max_length: int
) -> tuple[list[int], int]:
    """``(input_ids, prompt_length)`` for one instruction example under the truncation rule."""
    full_response = response + eos
    budget = max_length - len(bos)
    if len(prompt) + len(full_response) <= budget:
        return bos + prompt + full_response, len(bos) + len(prompt)
    if len(prompt) < budget:  # the prompt fits: cut the response on the right
        return bos + prompt + full_response[: budget - len(prompt)], len(bos) + len(prompt)
    keep = budget - 1  # the prompt fills the budget: keep its last tokens and one response token
    kept_prompt = prompt[len(prompt) - keep :] if keep > 0 else []
    return bos + kept_prompt + full_response[:1], len(bos) + len(kept_prompt)


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    domains: Sequence[str],
    max_length: int,
    add_eos: bool = True,
    add_bos: bool = False,
    progress: bool | None = None,
) -> TokenizedSplit:
    """Tokenise normalised records (see :mod:`mixsel.data.loading`) with a Hugging Face tokenizer.

    Args:
        records: dicts with ``domain`` and either ``text`` or ``prompt`` + ``response``.
        tokenizer: a ``transformers`` tokenizer (fast ones are much quicker: the batch API is used).
        domains: the domain names in id order; every record's domain must be among them.
        max_length: the longest sequence kept, special tokens included (>= 2).
        add_eos: append ``tokenizer.eos_token_id`` to each text / response.
        add_bos: prepend ``tokenizer.bos_token_id`` to each example.
        progress: show a tqdm bar (default: for more than 20,000 records).

    Returns:
        A :class:`TokenizedSplit` in record order, without the dropped examples (see the module
        docstring for the exact layout and truncation rule).

    Raises:
        ValueError: a record of an unknown domain or without text / prompt+response, or a missing
            special token, or ``max_length < 2``.
    """
    if int(max_length) < 2:
        raise ValueError(f"data.max_length must be at least 2 (one context and one target token), got {max_length}")
    domains = list(domains)
    domain_id = {d: i for i, d in enumerate(domains)}
    if len(domain_id) != len(domains):
        raise ValueError(f"domains {domains} repeat a name; list each domain once")
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    eos = [_special_id(tokenizer, "eos")] if add_eos else []
    if progress is None:
        progress = len(records) > _PROGRESS_MIN

    plain_rows, instr_rows = [], []
    for i, rec in enumerate(records):
        if rec.get("domain") not in domain_id:
            raise ValueError(
                f"record {i} has domain {rec.get('domain')!r}, which is not among domains={domains}; "
                "filter the records with select_domains or add the domain"
            )
        if "prompt" in rec and "response" in rec:
            instr_rows.append(i)
        elif "text" in rec:
            plain_rows.append(i)
        else:
            raise ValueError(
                f"record {i} (domain {rec['domain']!r}) has neither 'text' nor 'prompt' + 'response'; "
                f"its keys are {sorted(rec)}"
            )

    ids: list[list[int]] = [[] for _ in records]
    prompt_len = [0] * len(records)
    plain = _encode(
        tokenizer,
        [str(records[i]["text"]) for i in plain_rows],
        max_tokens=max_length - len(bos),
        progress=progress,
        desc="tokenize text",
    )
    for i, toks in zip(plain_rows, plain):
        ids[i] = (bos + toks + eos)[:max_length]
    prompts = _encode(
        tokenizer, [str(records[i]["prompt"]) for i in instr_rows], max_tokens=None, progress=progress, desc="prompts"
    )
    responses = _encode(
        tokenizer,
        [str(records[i]["response"]) for i in instr_rows],
        max_tokens=max_length,
        progress=progress,
        desc="responses",
    )
    for i, p_ids, r_ids in zip(instr_rows, prompts, responses):
        ids[i], prompt_len[i] = _instruction_ids(p_ids, r_ids, bos, eos, max_length)

    input_ids, labels, dom, prompt_text, answers = [], [], [], [], []
    dropped = 0
    for i, rec in enumerate(records):
        seq_ids = ids[i]
        if len(seq_ids) - max(prompt_len[i], 1) <= 0:  # target positions are t >= max(1, prompt length)
            dropped += 1
            continue
        seq = torch.tensor(seq_ids, dtype=torch.long)
        lab = seq.clone()
        lab[: prompt_len[i]] = IGNORE_INDEX
        input_ids.append(seq)
        labels.append(lab)
        dom.append(domain_id[rec["domain"]])
        prompt_text.append(str(rec["prompt"]) if "prompt" in rec and "response" in rec else None)
        answer = rec.get("answer")
        answers.append(None if answer is None else str(answer))
    if dropped:
        message = (
            f"dropped {dropped} of {len(records)} examples with no target token after tokenisation and "
            f"truncation to max_length={max_length} (empty text, or a one-token sequence)"
        )
        warnings.warn(message, stacklevel=2)
        log.warning(message)
    return TokenizedSplit(
        domains=domains,
        domain_ids=torch.tensor(dom, dtype=torch.long),
        input_ids=input_ids,
        labels=labels,
        prompts=prompt_text,
        answers=answers,
    )
