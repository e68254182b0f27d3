"""``static``: fixed user weights, or temperature sampling ``p_d ∝ n_d^alpha`` from domain sizes.

Temperature sampling is the multilingual-pretraining recipe (e.g. XLM, mT5: ``alpha < 1`` upsamples
small domains; ``alpha = 1`` is proportional to size; ``alpha = 0`` is uniform).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mixsel.errors import ConfigError, DataError
from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import as_domain_vector, normalize
from mixsel.types import DomainStats

__all__ = ["StaticReweighter", "read_weights_from", "temperature_weights"]


def read_weights_from(source: str | Path) -> dict[str, float]:
    """The domain weights a finished run's ``result.json`` (or its folder) holds, for ``weights_from``.

    ``average_weights`` (DoReMi's stage-one output) or else ``final_weights``, by domain. Each way the
    file can be wrong is one line naming ``reweighting.options.weights_from``: missing, a binary or
    non-UTF-8 file, not JSON, or JSON that is not a mixsel result.

    Raises:
        FileNotFoundError: no such file (or a folder without ``result.json``).
        ValueError: the file is not a mixsel ``result.json``.
    """
    field = f"reweighting.options.weights_from={str(source)!r}"
    path = Path(source)
    if path.is_dir():
        path = path / "result.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{field}: {path} not found; point it at a finished run's result.json (e.g. runs/doremi_proxy/result.json)"
        )
    raw = path.read_bytes()
    try:
        result = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(
            f"{field}: {path} is a binary (not UTF-8) file (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "point it at a finished run's result.json"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{field}: {path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg}); point it at a "
            "finished run's result.json"
        ) from None
    values = result.get("average_weights") or result.get("final_weights") if isinstance(result, dict) else None
    domains = result.get("domains") if isinstance(result, dict) else None
    if (
        not isinstance(values, list)
        or not isinstance(domains, list)
        or len(values) != len(domains)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise DataError(
            f"{field}: {path} has no domains with average_weights / final_weights of the same length: is it a "
            "mixsel result.json?"
        )
    return {str(d): float(v) for d, v in zip(domains, values, strict=True)}


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
