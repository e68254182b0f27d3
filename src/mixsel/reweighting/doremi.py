"""``doremi``: Group-DRO domain reweighting by excess loss over a reference model.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023,
Algorithm 1. At each update t, with proxy losses ℓ_θ and reference losses ℓ_ref:

    λ_t[d] = max(mean_{x in domain d}(ℓ_θ(x) - ℓ_ref(x)), 0)             (excess loss, line 7)
    α'_t   = α_{t-1} ⊙ exp(η λ_t),  α'_t ← α'_t / Σ_d α'_t[d]              (exponentiated gradient, line 8)
    α_t    = (1 - ε) α'_t + ε u,    u = uniform                           (smoothing, line 9)

and the output of the proxy run is the time average ᾱ = (1/T) Σ_{t=1..T} α_t (line 12), which the
two-stage recipe uses as fixed sampling weights for the main run (see :attr:`average_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch

from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import DTYPE, as_domain_vector, exponentiated_step, normalize, smooth
from mixsel.types import DomainStats

__all__ = ["DoReMiReweighter", "doremi_step", "excess_loss"]

Absent = Literal["zero", "previous"]


def excess_loss(stats: DomainStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain clipped excess loss ``max(mean(ℓ - ℓ_ref), 0)`` and the presence mask.

    Args:
        stats: counts, loss_sum and ref_loss_sum per domain.

    Returns:
        (Tensor[D] float64 excess, 0 where a domain is absent; BoolTensor[D] ``counts > 0``).
    """
    if stats.ref_loss_sum is None:
        raise ValueError(
            "doremi needs DomainStats.ref_loss_sum (summed per-example loss of the reference model); "
            "run the reference model on the same examples and fill ref_loss_sum."
        )
    counts = stats.counts.to(DTYPE)
    present = counts > 0
    diff = (stats.loss_sum.to(DTYPE) - stats.ref_loss_sum.to(DTYPE)) / counts.clamp_min(1e-300)
    # Finite inputs can still overflow the difference (e.g. 1e308 - (-1e308)); saturate instead.
    diff = torch.nan_to_num(diff, posinf=1e300, neginf=-1e300)
    lam = torch.where(present, diff.clamp_min(0.0), torch.zeros_like(diff))
    return lam, present


def doremi_step(weights: torch.Tensor, excess: torch.Tensor, *, step_size: float, smoothing: float) -> torch.Tensor:
    """One DoReMi update (Algorithm 1, lines 8-9): ``smooth(normalise(α ⊙ exp(η λ)), ε)``."""
    return smooth(exponentiated_step(weights, step_size * excess), smoothing)


@register_reweighter("doremi")
class DoReMiReweighter(ScheduledReweighter):
    """DoReMi online domain weights (Group DRO on excess loss), with their running average.

    The per-domain excess is computed from the summed losses of the window, so it is the clipped
    *mean* excess of the domain's examples (Algorithm 1 clips each token's excess before
    averaging; to reproduce that, put ``sum max(ℓ, ℓ_ref)`` in ``loss_sum`` and ``sum ℓ_ref`` in
    ``ref_loss_sum``, and token counts in ``counts`` for token-level averaging).

    Args:
        domains: domain names in id order.
        step_size: η of the exponentiated-gradient step (paper: 1.0). Lower it if weights turn
            one-hot (sangmichaelxie/doremi#5).
        smoothing: ε of the mix with uniform (paper: 1e-3); keeps every weight ≥ ε / D.
        initial_weights: α_0 as a list / ``{domain: w}`` dict (normalised); default uniform.
        absent: excess used for a domain with no example in the window: ``"zero"`` (default, as in
            the reference implementation, whose per-domain mean is 0 without tokens; the domain's
            weight then only drifts by renormalisation) or ``"previous"`` (reuse its last excess).
        mode: where the weights act; default ``"loss"`` (the proxy run of the paper weights the
            per-domain losses with α_t). Use :attr:`average_weights` with ``static`` for stage two.
        proposal: in ``"loss"`` mode, the domain mixture the candidates are drawn from
            (:attr:`proposal_weights`): ``"uniform"`` (default; Algorithm 1 samples the proxy's
            minibatches from the uniform mixture u = 1/k) or ``"natural"`` (the sampler's default,
            the domains' sizes). Train the reference model on the same mixture.
        update_every: the rule runs once every this many ``update`` calls on the summed window.
    """

    default_mode: Mode = "loss"
    #: The training loop must fill ``DomainStats.ref_loss_sum`` from a reference model.
    needs_reference: ClassVar[bool] = True

    def __init__(
        self,
        domains: list[str],
        *,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
        initial_weights: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None,
        absent: Absent = "zero",
        mode: Mode | None = None,
        update_every: int = 1,
        proposal: str = "uniform",
    ) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        if proposal not in ("uniform", "natural"):
            raise ValueError(f"proposal={proposal!r} must be 'uniform' (Algorithm 1) or 'natural'.")
        self.proposal = proposal
        if not step_size >= 0 or step_size == float("inf"):
            raise ValueError(f"step_size={step_size} must be a finite number >= 0 (paper: 1.0).")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing={smoothing} must lie in [0, 1] (paper: 1e-3).")
        if absent not in ("zero", "previous"):
            raise ValueError(f"absent={absent!r} must be 'zero' or 'previous'.")
        self.step_size = float(step_size)
        self.smoothing = float(smoothing)
        self.absent: Absent = absent
        if initial_weights is not None:
            self._weights = normalize(
                as_domain_vector(initial_weights, self.domains, "initial_weights"), "initial_weights"
            )
        self._initial = self._weights.clone()
        self._weight_sum = torch.zeros(self.num_domains, dtype=DTYPE)
        self._excess = torch.zeros(self.num_domains, dtype=DTYPE)

    @property
    def proposal_weights(self) -> torch.Tensor | None:
        """Tensor[D] the candidates are drawn from when the weights act on the loss; None = natural."""
        if self.proposal == "natural":
            return None
        return torch.full((self.num_domains,), 1.0 / self.num_domains, dtype=DTYPE)

    @property
    def average_weights(self) -> torch.Tensor:
        """Tensor[D] ᾱ = mean of α_1..α_T over the updates so far (α_0 before any update).

        This is the output of the proxy run in the two-stage recipe: pass it as
        ``get_reweighter("static", domains=..., weights=average_weights.tolist())`` to the main run.
        """
        if self.num_updates == 0:
            return self._initial.clone()
        avg = self._weight_sum / self.num_updates
        return avg / avg.sum()

    @property
    def excess(self) -> torch.Tensor:
        """Tensor[D] the per-domain excess λ used by the last update."""
        return self._excess.clone()

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        lam, present = excess_loss(stats)
        if self.absent == "previous":
            lam = torch.where(present, lam, self._excess)
        self._excess = lam
        new = doremi_step(self._weights, lam, step_size=self.step_size, smoothing=self.smoothing)
        self._weight_sum = self._weight_sum + new
        return new

    def _extra_log(self) -> dict[str, float]:
        out = {f"excess/{d}": float(v) for d, v in zip(self.domains, self._excess.tolist())}
        avg = self.average_weights.tolist()
        out.update({f"avg_weights/{d}": float(v) for d, v in zip(self.domains, avg)})
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "initial": self._initial.clone(),
            "weight_sum": self._weight_sum.clone(),
            "excess": self._excess.clone(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._initial = state["initial"].to(DTYPE).clone()
        self._weight_sum = state["weight_sum"].to(DTYPE).clone()
        self._excess = state["excess"].to(DTYPE).clone()
