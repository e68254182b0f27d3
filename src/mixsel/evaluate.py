"""Evaluation: per-domain loss / perplexity on a split, and GSM8K-style exact match by generation."""

from __future__ import annotations

import math
from typing import Any

import torch

from mixsel.features.loss import per_example_loss

__all__ = ["domain_losses", "exact_match"]


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
) -> dict[str, float]:
    """Greedy-decode the response to each prompt that has an ``answer`` and score exact match.

    The arithmetic and chemistry answers are checkable numbers (GSM8K-style ``#### N``); scoring uses
    :func:`mixsel.answers.is_correct`. Prompts are the tokenised prompts of the split (the
    same ids the model trained on), left-padded and decoded in batches. Returns
    ``{f"{prefix}/exact_match/<domain>": accuracy}`` for every domain with answers (first ``limit``
    examples of each).
    """
    from mixsel.answers import is_correct

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out: dict[str, float] = {}
    for d, name in enumerate(split.domains):
        idx = [int(i) for i in split.indices_of(d) if split.answers[int(i)] is not None and split.prompts[int(i)]]
        idx = idx[:limit]
        if not idx:
            continue
        correct = 0
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            prompts = [_prompt_ids(split, i) for i in rows]
            width = max(p.numel() for p in prompts)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
                input_ids[r, width - p.numel() :] = p
                attention[r, width - p.numel() :] = 1
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for r, i in enumerate(rows):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                correct += bool(is_correct(text, split.answers[i]))
        out[f"{prefix}/exact_match/{name}"] = correct / len(idx)
    model.train(was_training)
    return out
