"""The :class:`Reweighter` protocol: domain weights that evolve with training statistics.

A reweighter owns a weight vector on the simplex over the domains. Its ``mode`` says where the
weights act: ``"sampling"`` (which domains fill the candidate pool), ``"loss"`` (per-domain loss
weights in the training objective) or ``"both"``. The training loop calls ``update(stats)`` every
``update_every`` steps with :class:`mixsel.DomainStats` that were all-reduced across ranks, so every
rank computes identical weights.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mixsel.types import DomainStats

__all__ = ["Mode", "Reweighter"]

Mode = Literal["sampling", "loss", "both"]


@runtime_checkable
class Reweighter(Protocol):
    name: str
    domains: list[str]
    mode: Mode

    @property
    def weights(self) -> torch.Tensor:
        """Tensor[D] current domain weights, non-negative, summing to 1."""
        ...

    def update(self, stats: DomainStats) -> torch.Tensor:
        """Consume one step's statistics; return the new weights."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
