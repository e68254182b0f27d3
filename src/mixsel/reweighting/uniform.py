"""``uniform``: every domain gets weight ``1 / D`` forever (the natural baseline)."""

from __future__ import annotations

import torch

from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import uniform
from mixsel.types import DomainStats

__all__ = ["UniformReweighter"]


@register_reweighter("uniform")
class UniformReweighter(ScheduledReweighter):
    """Constant uniform domain weights ``w_d = 1 / D``; ``update`` only validates and counts.

    Args:
        domains: domain names in id order.
        mode: where the weights act (default ``"sampling"``).
        update_every: schedule of the (no-op) updates; kept for a uniform interface.
    """

    default_mode: Mode = "sampling"

    def __init__(self, domains: list[str], *, mode: Mode | None = None, update_every: int = 1) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        self._weights = uniform(self.num_domains)

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        return self._weights
