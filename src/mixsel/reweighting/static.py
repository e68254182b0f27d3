"""``static``: fixed user weights, or temperature sampling ``p_d ∝ n_d^alpha`` from domain sizes.

Temperature sampling is the multilingual-pretraining recipe (e.g. XLM, mT5: ``alpha < 1`` upsamples
small domains; ``alpha = 1`` is proportional to size; ``alpha = 0`` is uniform).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import as_domain_vector, normalize
from mixsel.types import DomainStats

__all__ = ["StaticReweighter", "temperature_weights"]


def temperature_weights(domain_sizes: torch.Tensor, alpha: float) -> torch.Tensor:
    """Temperature-sampling weights ``p_d = n_d^alpha / sum_j n_j^alpha``.

    Args:
        domain_sizes: Tensor[D] non-negative sizes (examples or tokens); empty domains get weight 0.
        alpha: exponent in ``[0, inf)``; ``1`` = proportional, ``0`` = uniform over non-empty domains.

    Returns:
        Tensor[D] float64 on the simplex.
    """
    if not alpha >= 0:
        raise ConfigError(f"alpha={alpha} must be >= 0 (1 = proportional to size, 0 = uniform).")
    sizes = torch.as_tensor(domain_sizes, dtype=torch.float64)
    if bool((sizes < 0).any()):
        raise ConfigError(f"domain_sizes {sizes.tolist()} has negative entries; sizes must be >= 0.")
    if not bool((sizes > 0).any()):
        raise ConfigError("domain_sizes are all zero; at least one domain must be non-empty.")
    # Work in log space so that huge sizes with large alpha cannot overflow; size 0 -> weight 0.
    logits = torch.where(sizes > 0, alpha * torch.log(sizes.clamp_min(1e-300)), float("-inf"))
    return torch.softmax(logits, dim=0)


@register_reweighter("static")
class StaticReweighter(ScheduledReweighter):
    """Fixed domain weights; ``update`` never changes them.

    Give exactly one of ``weights`` (normalised to sum to one) or ``domain_sizes`` (temperature
    sampling with exponent ``alpha``).

    Args:
        domains: domain names in id order.
        weights: non-negative weights, a list in domain order or a ``{domain: weight}`` dict.
        domain_sizes: domain sizes (list or dict by name) for ``p_d ∝ n_d^alpha``.
        alpha: temperature exponent for ``domain_sizes`` (default 1.0 = proportional).
        mode: where the weights act (default ``"sampling"``).
        update_every: schedule of the (no-op) updates; kept for a uniform interface.
    """

    default_mode: Mode = "sampling"

    def __init__(
        self,
        domains: list[str],
        *,
        weights: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None,
        domain_sizes: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None,
        alpha: float = 1.0,
        mode: Mode | None = None,
        update_every: int = 1,
    ) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        if (weights is None) == (domain_sizes is None):
            raise ConfigError(
                "static reweighter needs exactly one of weights=[...] (or {domain: weight}) or "
                "domain_sizes=[...] with alpha; use the 'uniform' reweighter for equal weights."
            )
        if weights is not None:
            self._weights = normalize(as_domain_vector(weights, self.domains, "weights"), "weights")
        else:
            sizes = as_domain_vector(domain_sizes, self.domains, "domain_sizes")  # type: ignore[arg-type]
            self._weights = temperature_weights(sizes, alpha)
        self.alpha = alpha

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        return self._weights
