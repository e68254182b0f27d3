"""``doremi``: Group-DRO domain reweighting by excess loss over a reference model.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023
(arXiv 2305.10429), Algorithm 1. At each update t, with per-token proxy losses ℓ_θ and reference
losses ℓ_ref:

    λ_t[d] = (1 / |tokens of d|) Σ_{tokens of d} max(ℓ_θ - ℓ_ref, 0)     (excess loss, line 7)
    α'_t   = α_{t-1} ⊙ exp(η λ_t),  α'_t ← α'_t / Σ_d α'_t[d]              (exponentiated gradient, line 8)
    α_t    = (1 - ε) α'_t + ε u,    u = uniform                           (smoothing, line 9)

The excess is clipped per token and then averaged over the domain's target tokens in the update
window (paper and code); ``clip="domain"`` averages the per-example excess first and clips the
domain mean. A domain without tokens in the window keeps its previous score (the reference code's
``update_domain_weights``). The output of the proxy run is the time average of the weights (line
12), which the two-stage recipe uses as fixed sampling weights for the main run
(:attr:`average_weights`): the reference code's running mean includes the initial weights,
ᾱ = (α_0 + Σ_{t=1..T} α_t) / (T + 1) (``average="with_initial"``, the default); the paper writes
(1/T) Σ_{t=1..T} α_t (``average="updates"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import DTYPE, as_domain_vector, exponentiated_step, normalize, smooth
from mixsel.types import DomainStats

__all__ = ["AVERAGES", "CLIPS", "DoReMiReweighter", "doremi_step", "excess_loss"]

Absent = Literal["zero", "previous"]
#: Where the excess is clipped: per token (paper and code) or on the domain mean.
CLIPS = ("token", "domain")
#: How the running average of the weights is formed.
AVERAGES = ("with_initial", "updates")


def excess_loss(stats: DomainStats, *, clip: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain excess loss λ and the presence mask.

    Args:
        stats: per-domain statistics. ``clip="token"`` needs ``token_counts`` and ``excess_sum``
            (the summed per-token clipped excess, :func:`mixsel.bookkeeping.domain_stats` with
            per-token losses); ``clip="domain"`` needs ``counts``, ``loss_sum``, ``ref_loss_sum``.
        clip: ``"token"``: λ_d = excess_sum_d / token_counts_d (Algorithm 1 line 7);
            ``"domain"``: λ_d = max(mean over the domain's examples of (ℓ - ℓ_ref), 0).

    Returns:
        (Tensor[D] float64 excess, 0 where a domain is absent; BoolTensor[D] presence).
    """
    if clip not in CLIPS:
        raise ConfigError(f"clip={clip!r} must be 'token' (per-token clipping, the paper) or 'domain'")
    if clip == "token":
        if stats.excess_sum is None or stats.token_counts is None:
            raise ValueError(
                "doremi with clip='token' needs DomainStats.token_counts and excess_sum (the per-token clipped "
                "excess): build the stats with mixsel.bookkeeping.domain_stats(..., per-token losses, "
                "ref_losses=reference_losses(...), mask=target_mask(labels)), or set clip='domain'"
            )
        tokens = stats.token_counts.to(DTYPE)
        present = tokens > 0
        lam = stats.excess_sum.to(DTYPE) / tokens.clamp_min(1e-300)
        lam = torch.nan_to_num(lam, posinf=1e300, neginf=0.0).clamp_min(0.0)
        return torch.where(present, lam, torch.zeros_like(lam)), present
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

    Args:
        domains: domain names in id order.
        step_size: η of the exponentiated-gradient step (paper: 1.0). Lower it if weights turn
            one-hot (sangmichaelxie/doremi#5).
        smoothing: ε of the mix with uniform (paper: 1e-3); keeps every weight ≥ ε / D.
        initial_weights: α_0 as a list / ``{domain: w}`` dict (normalised); default uniform.
        clip: ``"token"`` (default: clip each token's excess at 0, then average over the domain's
            tokens, Algorithm 1 and the reference code) or ``"domain"`` (clip the domain's mean
            per-example excess).
        absent: excess used for a domain with no token in the window: ``"previous"`` (default, the
            reference code: it keeps its last score) or ``"zero"`` (its weight then only drifts by
            renormalisation).
        initial_excess: the score a domain keeps under ``absent="previous"`` before its first
            appearance (default 0; the reference code starts at log |vocabulary|).
        average: ``"with_initial"`` (default, the reference code: ᾱ includes α_0) or ``"updates"``
            (the paper: the mean of α_1..α_T).
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
        clip: str = "token",
        absent: Absent = "previous",
        initial_excess: float = 0.0,
        average: str = "with_initial",
        mode: Mode | None = None,
        update_every: int = 1,
        proposal: str = "uniform",
    ) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        if proposal not in ("uniform", "natural"):
            raise ConfigError(f"proposal={proposal!r} must be 'uniform' (Algorithm 1) or 'natural'.")
        self.proposal = proposal
        if not step_size >= 0 or step_size == float("inf"):
            raise ConfigError(f"step_size={step_size} must be a finite number >= 0 (paper: 1.0).")
        if not 0.0 <= smoothing <= 1.0:
            raise ConfigError(f"smoothing={smoothing} must lie in [0, 1] (paper: 1e-3).")
        if absent not in ("zero", "previous"):
            raise ConfigError(f"absent={absent!r} must be 'previous' (the reference code) or 'zero'.")
        if clip not in CLIPS:
            raise ConfigError(f"clip={clip!r} must be 'token' (the paper) or 'domain'.")
        if average not in AVERAGES:
            raise ConfigError(f"average={average!r} must be 'with_initial' (the reference code) or 'updates'.")
        if not initial_excess >= 0 or initial_excess == float("inf"):
            raise ConfigError(f"initial_excess={initial_excess} must be a finite number >= 0.")
        self.step_size = float(step_size)
        self.smoothing = float(smoothing)
        self.absent: Absent = absent
        self.clip = clip
        self.average = average
        if initial_weights is not None:
            self._weights = normalize(
                as_domain_vector(initial_weights, self.domains, "initial_weights"), "initial_weights"
            )
        self._initial = self._weights.clone()
        self._weight_sum = torch.zeros(self.num_domains, dtype=DTYPE)
        self._excess = torch.full((self.num_domains,), float(initial_excess), dtype=DTYPE)

    @property
    def proposal_weights(self) -> torch.Tensor | None:
        """Tensor[D] the candidates are drawn from when the weights act on the loss; None = natural."""
        if self.proposal == "natural":
            return None
        return torch.full((self.num_domains,), 1.0 / self.num_domains, dtype=DTYPE)

    @property
    def average_weights(self) -> torch.Tensor:
        """Tensor[D] ᾱ: the running average of the weights (α_0 before any update).

        ``average="with_initial"``: (α_0 + α_1 + ... + α_T) / (T + 1) (the reference code);
        ``"updates"``: (α_1 + ... + α_T) / T (the paper). This is the output of the proxy run in
        the two-stage recipe: pass it as ``get_reweighter("static", domains=...,
        weights=average_weights.tolist())`` to the main run.
        """
        if self.num_updates == 0:
            return self._initial.clone()
        if self.average == "with_initial":
            avg = (self._initial + self._weight_sum) / (self.num_updates + 1)
        else:
            avg = self._weight_sum / self.num_updates
        return avg / avg.sum()

    @property
    def excess(self) -> torch.Tensor:
        """Tensor[D] the per-domain excess λ used by the last update."""
        return self._excess.clone()

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        lam, present = excess_loss(stats, clip=self.clip)
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
