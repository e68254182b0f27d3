"""The :class:`Reweighter` protocol: domain weights that evolve with training statistics.

A reweighter owns a weight vector on the simplex over the domains. Its ``mode`` says where the
weights act: ``"sampling"`` (which domains fill the candidate pool), ``"loss"`` (per-domain loss
weights in the training objective) or ``"both"``. The training loop calls ``update(stats)`` every
``update_every`` steps with :class:`mixsel.DomainStats` that were all-reduced across ranks, so every
rank computes identical weights.

What a reweighter needs from the training loop is declared on it, as a selector declares its
features in ``requires``: ``needs_reference`` (fill :attr:`mixsel.DomainStats.ref_loss_sum` with a
frozen reference model's losses) and ``needs_grad`` (fill ``DomainStats.grad`` with summed
per-domain gradient features and, on update steps, ``DomainStats.val_grad``). Both loops
(``mixsel train`` and the Hugging Face trainers) read these attributes and nothing else, through
:mod:`mixsel.bookkeeping`. :class:`mixsel.reweighting.common.ScheduledReweighter` gives every
attribute its default.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mixsel.types import DomainStats

__all__ = ["Mode", "Reweighter"]

Mode = Literal["sampling", "loss", "both"]


@runtime_checkable
class Reweighter(Protocol):
    """Domain weights on the simplex, updated from per-domain training statistics.

    Attributes:
        name: the registered name.
        domains: domain names in id order.
        mode: where the weights act: ``"sampling"``, ``"loss"`` or ``"both"``.
        needs_reference: ``update`` needs ``DomainStats.ref_loss_sum`` (DoReMi).
        needs_grad: ``update`` needs ``DomainStats.grad`` and, on update steps, ``val_grad`` (DoGraph).
        needs_val_grad: ``update`` reads ``DomainStats.val_grad`` on update steps (optional attribute;
            the loops take ``needs_grad`` when it is absent; DoGE's default target does not read it).
        update_every: the update rule runs once every this many ``update`` calls (the calls in
            between accumulate their statistics).
    """

    name: str
    domains: list[str]
    mode: Mode
    needs_reference: bool
    needs_grad: bool
    update_every: int

    @property
    def weights(self) -> torch.Tensor:
        """Tensor[D] current domain weights, non-negative, summing to 1."""
        ...

    @property
    def proposal_weights(self) -> torch.Tensor | None:
        """Tensor[D] the candidate pool is drawn from when the weights act only on the loss; None = natural."""
        ...

    @property
    def average_weights(self) -> torch.Tensor | None:
        """Tensor[D] time-averaged weights (DoReMi's stage-one output), or None when not tracked."""
        ...

    def log_dict(self) -> dict[str, float]:
        """``weights/<domain>`` and method diagnostics, for the metric loggers."""
        ...

    def update(self, stats: DomainStats) -> torch.Tensor:
        """Consume one step's statistics; return the new weights."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
