"""Evaluation: per-domain loss / perplexity on a split, and exact match of generated answers per domain."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mixsel.answers import Checker, checkers_for, states_answer
from mixsel.data.tokenize import IGNORE_INDEX
from mixsel.errors import ConfigError
from mixsel.features.loss import per_example_loss

__all__ = ["answer_checkers", "domain_losses", "exact_match", "exact_match_prompts", "greedy_generate"]

log = logging.getLogger(__name__)


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    split: Any,
    *,
    pad_token_id: int,
    batch_size: int = 32,
    max_per_domain: int | None = None,
    prefix: str = "val",
) -> dict[str, float]:
    """Mean per-example loss of each domain of a :class:`mixsel.data.TokenizedSplit`.

    Returns ``{f"{prefix}/loss/<domain>": ..., f"{prefix}/loss_mean": ..., f"{prefix}/loss_worst": ...,
    f"{prefix}/ppl_mean": ...}``. The mean is the unweighted average over domains (each domain
    counts the same), the worst is the largest domain loss.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    per_domain = []
    for d, name in enumerate(split.domains):
        idx = split.indices_of(d)
        if max_per_domain is not None:
            idx = idx[:max_per_domain]
        if idx.numel() == 0:
            continue
        total = 0.0
        for start in range(0, idx.numel(), batch_size):
            batch = split.collate(idx[start : start + batch_size], pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            total += float(per_example_loss(logits.float(), batch["labels"].to(device)).sum())
        mean = total / idx.numel()
        out[f"{prefix}/loss/{name}"] = mean
        per_domain.append(mean)
    model.train(was_training)
    if per_domain:
        out[f"{prefix}/loss_mean"] = sum(per_domain) / len(per_domain)
        out[f"{prefix}/loss_worst"] = max(per_domain)
        out[f"{prefix}/ppl_mean"] = math.exp(min(out[f"{prefix}/loss_mean"], 50.0))
    return out


@torch.no_grad()
def _prompt_ids(split: Any, i: int) -> torch.Tensor:
    """The prompt tokens of example ``i`` exactly as trained on: its leading label=-100 positions."""
    labels = split.labels[i]
    targets = torch.nonzero(labels != -100).flatten()
    end = int(targets[0]) if targets.numel() else labels.numel()
    return split.input_ids[i][:end]


def answer_checkers(eval_cfg: Any, domains: Sequence[str]) -> dict[str, Checker]:
    """The answer checker of each domain under ``eval.answer_checker`` / ``eval.answer_tolerance``.

    Call it at the start of a run to catch a misspelt checker early (:func:`exact_match` resolves
    the same names at the end); :func:`mixsel.answers.check_answer_checkers` also calls each once.

    Raises:
        ValueError: an unknown checker name or domain, or a ``package.module:function`` that does
            not import.
    """
    return checkers_for(eval_cfg.answer_checker, list(domains), tolerance=eval_cfg.answer_tolerance)


def _score(func: Checker, spec: str | Mapping[str, str], domain: str, row: int, text: str, answer: str) -> bool:
    """``func(text, answer)`` as a bool; a checker that raises is one line naming it, the domain and the row."""
    try:
        return bool(func(text, answer))
    except Exception as err:
        name = spec if isinstance(spec, str) else spec.get(domain, spec.get("*", "gsm8k"))
        why = " ".join(str(err).split()) or "no message"
        raise ConfigError(
            f"eval.answer_checker={name!r} raised {type(err).__name__} ({why}) on test row {row} of domain "
            f"{domain!r} (generated {text[:60]!r}, reference {answer!r}); make it return False for text it cannot read"
        ) from None


def _response_tokens(split: Any, i: int, eos_token_id: int | None) -> int:
    """Tokens of example ``i``'s response, without a final eos: what generation has to produce."""
    labels = split.labels[i]
    n = int((labels != IGNORE_INDEX).sum())
    return n - 1 if n and eos_token_id is not None and int(labels[-1]) == eos_token_id else n


def _cache_arg() -> str:
    """The name of ``generate``'s key/value cache, argument and output field: ``cache`` in recent
    transformers (5.2x; ``past_key_values`` is deprecated there), ``past_key_values`` before."""
    try:
        from transformers.generation.utils import GenerateDecoderOnlyOutput
    except ImportError:  # pragma: no cover - transformers is an extra
        return "past_key_values"
    return "cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {}) else "past_key_values"


_CACHE_ARG = _cache_arg()


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    chunk: int = 16,
) -> list[torch.Tensor]:
    """Greedy decoding of a left-padded batch that stops computing the rows that have ended.

    ``model.generate`` decodes every row until the longest one ends (a finished row keeps being
    computed, padded). Exact-match generations are very uneven - a fine-tuned SmolLM2-135M answers
    most test problems in 10-60 tokens while a few repeat themselves up to the limit
    (`docs/results.md`, section 8) - so here ``generate`` runs ``chunk`` tokens at a time and, between
    chunks, the rows that produced the end-of-sequence token leave the batch and its key/value cache
    (``Cache.batch_select_indices``); the others continue from the cache. Each row gets the tokens
    an uninterrupted greedy ``generate`` of the same batch gives it (tests/test_evaluate.py).

    Args:
        input_ids: ``[rows, width]`` prompts, left-padded.
        attention_mask: ``[rows, width]``, 0 on the padding.
        max_new_tokens: the most tokens generated per row.
        eos_token_id: the token that ends a row (``None``: every row runs to ``max_new_tokens``).
        pad_token_id: passed to ``generate``.
        chunk: tokens decoded between two removals of finished rows.

    Returns:
        Per row, its generated tokens, up to and including the first end-of-sequence token.
    """
    rows = list(range(input_ids.shape[0]))
    out: list[list[int]] = [[] for _ in rows]
    ids, mask, cache, produced = input_ids, attention_mask, None, 0
    while rows and produced < max_new_tokens:
        step = min(chunk, max_new_tokens - produced)
        res = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **{_CACHE_ARG: cache},
            max_new_tokens=step,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            return_dict_in_generate=True,
        )
        new = res.sequences[:, ids.shape[1] :].tolist()
        keep = []
        for j, row in enumerate(rows):
            if eos_token_id is not None and eos_token_id in new[j]:
                out[row] += new[j][: new[j].index(eos_token_id) + 1]
            else:
                out[row] += new[j]
                keep.append(j)
        produced += step
        if not keep or produced >= max_new_tokens:
            break
        index = torch.tensor(keep, device=ids.device)
        ids = res.sequences[index]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], step)], dim=1)[index]
        cache = getattr(res, _CACHE_ARG)
        cache.batch_select_indices(index)
        rows = [rows[j] for j in keep]
    return [torch.tensor(t, dtype=torch.long) for t in out]


def exact_match_prompts(split: Any, limit: int) -> dict[str, list[int]]:
    """The rows of ``split`` that :func:`exact_match` decodes, by domain.

    Args:
        split: a :class:`mixsel.data.TokenizedSplit` (usually the test split).
        limit: ``eval.exact_match``, the most prompts scored per domain.

    Returns:
        ``{domain: row indices}``: the first ``limit`` rows of each domain that have a prompt and a
        reference answer; a domain without any is left out.
    """
    out: dict[str, list[int]] = {}
    for d, name in enumerate(split.domains):
        idx = [int(i) for i in split.indices_of(d) if split.answers[int(i)] is not None and split.prompts[int(i)]]
        if idx[:limit]:
            out[name] = idx[:limit]
    return out


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    split: Any,
    *,
    limit: int = 32,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    prefix: str = "val",
    checker: str | Mapping[str, str] = "gsm8k",
    tolerance: float = 1e-6,
    records: list[dict[str, Any]] | None = None,
    chunk: int = 16,
) -> dict[str, float]:
    """Greedy-decode the response to each prompt that has a reference answer, and score it.

    Every domain with answers is scored (an ``answer`` column, or the answer a response states:
    :func:`mixsel.answers.reference_answer`), except prompts whose response was cut to fit
    ``data.max_length`` (their answer is ``None``). Prompts are the tokenised prompts of the split
    (the same ids the model trained on), left-padded and decoded in batches (:func:`greedy_generate`:
    finished rows leave the batch); the decoded text and the
    reference go to the domain's checker (:mod:`mixsel.answers`). A warning names each domain whose
    reference responses are longer than ``max_new_tokens``.

    Args:
        limit: the first ``limit`` scorable prompts of each domain are scored.
        checker: ``eval.answer_checker``: a checker name for every domain, or ``{domain: name}``
            with ``"*"`` for the others.
        tolerance: ``eval.answer_tolerance`` (``numeric`` and ``sympy`` checkers).
        records: when given, one dict per scored prompt is appended: ``domain``, ``row`` (its index
            in ``split``), ``generated`` (the decoded text), ``answer`` (the reference), ``correct``,
            ``new_tokens`` (generated tokens, the end-of-sequence token included) and ``finished``
            (whether it ended with the end-of-sequence token within ``max_new_tokens``) and
            ``stated`` (whether it states its answer on a ``####`` line or in a ``\\boxed{}``:
            :func:`mixsel.answers.states_answer`).
        chunk: tokens decoded between two removals of finished rows (:func:`greedy_generate`; at
            least ``max_new_tokens``: one ``generate`` call per batch, every row decoded until the
            batch's longest ends).

    Returns:
        ``{f"{prefix}/exact_match/<domain>": accuracy}`` for every scored domain, and
        ``f"{prefix}/exact_match_mean"``, their unweighted mean (absent when no domain is scored);
        per scored domain also ``f"{prefix}/generation/tokens/<domain>"``, the mean number of
        generated tokens, and ``f"{prefix}/generation/finished/<domain>"``, the share of generations
        that ended within ``max_new_tokens`` (a model that has not learnt where an answer ends runs
        to the limit), and ``f"{prefix}/generation/stated/<domain>"``, the share that state their
        answer in the reference solutions' form (a model that has not learnt the format is scored on
        its last number).
    """
    checkers = checkers_for(checker, list(split.domains), tolerance=tolerance)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out: dict[str, float] = {}
    for name, idx in exact_match_prompts(split, limit).items():
        lengths = [_response_tokens(split, i, tokenizer.eos_token_id) for i in idx]
        longer = sum(n > max_new_tokens for n in lengths)
        if longer:
            message = (
                f"eval.max_new_tokens={max_new_tokens} is shorter than {longer} of the {len(idx)} reference responses "
                f"of domain {name!r} (longest {max(lengths)} tokens); raise eval.max_new_tokens, or those answers "
                "cannot be generated in full"
            )
            warnings.warn(message, stacklevel=3)  # the caller, past torch.no_grad's wrapper
            log.warning(message)
        correct, tokens, finished, stated = 0, 0, 0, 0
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            prompts = [_prompt_ids(split, i) for i in rows]
            width = max(p.numel() for p in prompts)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
                input_ids[r, width - p.numel() :] = p
                attention[r, width - p.numel() :] = 1
            gen = greedy_generate(
                model,
                input_ids.to(device),
                attention.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                chunk=chunk,
            )
            for r, i in enumerate(rows):
                text = tokenizer.decode(gen[r], skip_special_tokens=True)
                ok = _score(checkers[name], checker, name, i, text, split.answers[i])
                n_new = int(gen[r].numel())
                ended = bool(n_new) and tokenizer.eos_token_id is not None and int(gen[r][-1]) == tokenizer.eos_token_id
                says = states_answer(text)
                correct, tokens, finished, stated = correct + ok, tokens + n_new, finished + ended, stated + says
                if records is not None:
                    records.append(
                        {
                            "domain": name,
                            "row": i,
                            "generated": text,
                            "answer": split.answers[i],
                            "correct": ok,
                            "new_tokens": n_new,
                            "finished": ended,
                            "stated": says,
                        }
                    )
        out[f"{prefix}/exact_match/{name}"] = correct / len(idx)
        out[f"{prefix}/generation/tokens/{name}"] = tokens / len(idx)
        out[f"{prefix}/generation/finished/{name}"] = finished / len(idx)
        out[f"{prefix}/generation/stated/{name}"] = stated / len(idx)
    model.train(was_training)
    scored = [v for k, v in out.items() if k.startswith(f"{prefix}/exact_match/")]
    if scored:
        out[f"{prefix}/exact_match_mean"] = sum(scored) / len(scored)
    return out
