"""Small typed records shared by solvers, selectors, reweighters and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "FEATURE_NAMES",
    "GRADIENT_FEATURES",
    "PAIRWISE_FEATURES",
    "SCALAR_FEATURES",
    "ZEROTH_ORDER_FEATURES",
    "DomainStats",
    "Selection",
]

#: Per-example signals of one no-grad forward of the pool (``hidden``: mean-pooled LM-head input).
SCALAR_FEATURES = frozenset({"loss", "confidence", "perplexity", "completion_length", "hidden"})
#: Per-example gradient features and the quantities built from them.
GRADIENT_FEATURES = frozenset({"grads", "gram", "val_scores", "val_gram", "grad_norm"})
#: Gradient features that pair examples (inner products); rebuilt from gathered ``grads`` across ranks.
PAIRWISE_FEATURES = frozenset({"gram", "val_scores", "val_gram"})
#: CoLM's SPSA (zeroth-order) gradient features.
ZEROTH_ORDER_FEATURES = frozenset({"zo_grads"})
#: Every feature a selector may declare in ``requires`` (shapes: ``mixsel.selection.base``).
FEATURE_NAMES = SCALAR_FEATURES | GRADIENT_FEATURES | ZEROTH_ORDER_FEATURES


@dataclass
class Selection:
    """The result of a selection: which examples, in pick order, with which weights.

    Attributes:
        indices: LongTensor[k] of row indices into the candidate pool, in the order they were picked.
        weights: Tensor[k] of per-example weights aligned with ``indices`` (OMP coefficients, CRAIG
            cluster sizes, or ones). The training step normalises them.
        gains: optional Tensor[k] of marginal objective gains in pick order.
        residual: optional final relative residual (gradient-matching solvers).
        info: free-form diagnostics (solver backend, residual history, timings...).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    gains: torch.Tensor | None = None
    residual: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = torch.as_tensor(self.indices, dtype=torch.long).reshape(-1)
        self.weights = torch.as_tensor(self.weights).reshape(-1)
        if self.weights.numel() != self.indices.numel():
            raise ValueError(
                f"Selection.weights has {self.weights.numel()} entries but indices has "
                f"{self.indices.numel()}; they must align one to one."
            )

    def __len__(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def uniform(cls, indices: torch.Tensor, **kwargs: Any) -> Selection:
        """A selection with weight 1 for every picked index."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return cls(indices=indices, weights=torch.ones(indices.numel()), **kwargs)


@dataclass
class DomainStats:
    """Per-domain statistics of one (or several accumulated) training steps.

    All tensors are indexed by domain id (length = number of domains). Domains absent from the
    step have ``counts == 0``; their losses are 0 and must be ignored by consumers.

    Attributes:
        counts: Tensor[D] number of examples of each domain that contributed.
        loss_sum: Tensor[D] summed per-example training loss of each domain.
        ref_loss_sum: optional Tensor[D] summed per-example loss of a reference model (DoReMi).
        grad: optional Tensor[D, d] summed per-example gradient features of each domain.
        val_grad: optional Tensor[d] or Tensor[D, d] validation gradient features (target).
        step: training step the stats come from.
        token_counts: optional Tensor[D] number of target tokens of each domain's examples.
        excess_sum: optional Tensor[D] sum over each domain's target tokens of the clipped excess
            loss ``max(l_t - l_ref_t, 0)`` (DoReMi's per-token excess, arXiv 2305.10429 Alg. 1).
    """

    counts: torch.Tensor
    loss_sum: torch.Tensor
    ref_loss_sum: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    val_grad: torch.Tensor | None = None
    step: int = 0
    token_counts: torch.Tensor | None = None
    excess_sum: torch.Tensor | None = None

    @property
    def num_domains(self) -> int:
        return int(self.counts.numel())

    def mean_loss(self) -> torch.Tensor:
        """Per-domain mean loss; 0 where a domain is absent."""
        return self.loss_sum / self.counts.clamp_min(1)

    def mean_ref_loss(self) -> torch.Tensor | None:
        if self.ref_loss_sum is None:
            return None
        return self.ref_loss_sum / self.counts.clamp_min(1)

    def mean_grad(self) -> torch.Tensor | None:
        if self.grad is None:
            return None
        return self.grad / self.counts.clamp_min(1).unsqueeze(-1).to(self.grad.dtype)
