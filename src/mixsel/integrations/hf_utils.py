"""Small helpers of the Hugging Face integration: collation with a domain column, domain names, JSON state.

Kept free of ``transformers`` imports so that they can be tested (and reused) on their own.

* :class:`CausalLMCollator` right-pads ``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` on
  padding) of variable-length examples, the format of ``mixsel.data.tokenize``.
* :class:`DomainCollator` wraps any collator: it takes the domain column out of every example
  (integer ids, or names mapped through the domain list), collates the rest, and puts the domain
  back as a ``LongTensor`` column, so that default collators never drop or choke on it.
* :func:`infer_domains` lists the domain names of a dataset column.
* :func:`to_jsonable` / :func:`from_jsonable` turn a ``state_dict`` holding tensors into JSON and
  back exactly (float64 values round-trip through ``repr``), which ``TrainerState`` requires: it
  stores stateful callbacks in ``trainer_state.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mixsel.errors import DataError

__all__ = [
    "CausalLMCollator",
    "DomainCollator",
    "domain_id_of",
    "from_jsonable",
    "infer_domains",
    "mixture_datasets",
    "to_jsonable",
]

IGNORE_INDEX = -100
_TENSOR_TAG = "__tensor__"


class CausalLMCollator:
    """Right-pad causal-LM examples into a batch.

    Each example holds ``input_ids`` (and optionally ``labels``, ``attention_mask``) as lists or 1-D
    tensors of any length. ``labels`` default to ``input_ids``; padding gets ``pad_token_id`` in
    ``input_ids``, 0 in ``attention_mask`` and ``-100`` in ``labels``. Other keys are stacked with
    ``torch.as_tensor`` when they are numbers.

    Args:
        pad_token_id: id written into padded ``input_ids`` positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 on GPUs).
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("CausalLMCollator got an empty list of examples")
        if "input_ids" not in features[0]:
            raise DataError(f"examples need an 'input_ids' column; got {sorted(features[0])}")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        length = max(int(x.numel()) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        n = len(ids)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, length, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, (f, x) in enumerate(zip(features, ids)):
            t = x.numel()
            input_ids[i, :t] = x
            mask = f.get("attention_mask")
            attention_mask[i, :t] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
            lab = f.get("labels")
            labels[i, :t] = x if lab is None else torch.as_tensor(lab, dtype=torch.long).reshape(-1)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key, value in features[0].items():
            if key in batch or isinstance(value, str) or value is None:
                continue
            batch[key] = torch.as_tensor([f[key] for f in features])
        return batch


def domain_id_of(value: Any, domains: Sequence[str] | None, column: str) -> int:
    """The integer domain id of one example's domain ``value`` (an id, or a name in ``domains``).

    Raises:
        ValueError: a name that is not in ``domains`` (or no ``domains`` list to map names), or an
            id outside ``0 .. len(domains) - 1``.
    """
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, bool):
        raise DataError(f"the {column!r} column holds booleans; use integer ids or domain names")
    if isinstance(value, int):
        if value < 0 or (domains is not None and value >= len(domains)):
            limit = "" if domains is None else f" (there are {len(domains)} domains {list(domains)})"
            raise DataError(f"domain id {value} in column {column!r} is out of range{limit}")
        return value
    if isinstance(value, str):
        if domains is None:
            raise DataError(
                f"the {column!r} column holds names like {value!r}; set SelectionTrainingArguments.domains to the "
                "list of names (their position is the domain id)"
            )
        try:
            return list(domains).index(value)
        except ValueError:
            raise DataError(
                f"domain {value!r} in column {column!r} is not in SelectionTrainingArguments.domains={list(domains)}; "
                "add it to the list"
            ) from None
    raise DataError(f"the {column!r} column must hold integer ids or names, got {type(value).__name__}")


class DomainCollator:
    """Collate examples with an inner collator while keeping the domain column as a ``LongTensor``.

    Args:
        collator: the collator of the remaining columns (e.g. :class:`CausalLMCollator`).
        column: name of the domain column.
        domains: domain names in id order, to map name-valued columns (ids pass through).
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any], column: str, domains: Sequence[str] | None):
        self.collator = collator
        self.column = column
        self.domains = list(domains) if domains is not None else None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Any:
        if not features or self.column not in features[0]:
            return self.collator(list(features))
        ids = [domain_id_of(f[self.column], self.domains, self.column) for f in features]
        rest = [{k: v for k, v in f.items() if k != self.column} for f in features]
        batch = self.collator(rest)
        batch[self.column] = torch.tensor(ids, dtype=torch.long)
        return batch


def infer_domains(values: Sequence[Any], column: str = "domain") -> list[str]:
    """Domain names from the values of a domain column.

    Names: their sorted unique values. Integer ids ``0..D-1``: ``["0", ..., "D-1"]``.

    Raises:
        ValueError: an empty column or a mix of ids and names.
    """
    values = [v.item() if torch.is_tensor(v) else v for v in values]
    if not values:
        raise DataError(f"cannot infer domains: the {column!r} column is empty")
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"the {column!r} column has negative domain ids")
        return [str(i) for i in range(max(values) + 1)]
    raise DataError(f"the {column!r} column mixes types; use only integer ids or only names")


def to_jsonable(obj: Any) -> Any:
    """Recursively turn tensors into ``{"__tensor__": values, "dtype": ..., "shape": [...]}`` dicts."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu()
        return {
            _TENSOR_TAG: t.reshape(-1).tolist(),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(obj, Mapping):
        if _TENSOR_TAG in obj:
            dtype = getattr(torch, obj["dtype"])
            return torch.tensor(obj[_TENSOR_TAG], dtype=dtype).reshape(obj["shape"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def mixture_datasets(mixture: Any, splits: Sequence[str] = ("train", "validation")) -> dict[str, Any]:
    """The tokenised splits of a :class:`mixsel.data.Mixture` as ``datasets.Dataset`` objects.

    The rows, tokens and truncation are exactly ``mixsel train``'s (:func:`mixsel.data.load_mixture`),
    so a Trainer run on them draws and trains the same rows: columns ``input_ids``, ``labels``
    (-100 on masked prompt tokens) and ``domain`` (the domain's name).

    Example::

        tokenizer = build_tokenizer(cfg.model)
        mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
        data = mixture_datasets(mixture)
        trainer = SelectionTrainer(model=model, args=args, train_dataset=data["train"],
                                   eval_dataset=data["validation"])

    Args:
        mixture: the loaded mixture.
        splits: which splits to convert (``train``, ``validation``, ``test``).

    Returns:
        ``{split: datasets.Dataset}``.
    """
    from mixsel.data.sft import split_to_dataset

    out = {}
    for name in splits:
        out[name] = split_to_dataset(getattr(mixture, name))
    return out
