"""``doge``: domain weights from gradient alignment between domains (DoGE).

Fan, Pagliardini & Jaggi, "DoGE: Domain Reweighting with Generalization Estimation" (arXiv
2310.15393). A proxy model trains on the α-weighted domain losses; after each step the weight of a
domain grows with how well its gradient is aligned with the gradients of the *other* domains
(universal generalisation) or with the gradient of a *target* (out-of-domain generalisation). At
update t, with g_d the domain-mean gradient features of the window (``DomainStats.grad / counts``;
a domain absent from the window keeps its last gradient, as the official code keeps its row):

1. alignment score: ``s_d = Σ_{j≠d} ⟨g_d, g_j⟩`` (``target="others"``), or ``s_d = ⟨g_d, v⟩`` with
   v the validation gradient (``target="validation"``, DoGE's target-domain mode);
2. normalisation by the mean gradient norm: ``s_d ← s_d / (mean_j ‖g_j‖ + 1e-6)``;
3. clipping: ``s_d ← clip(s_d, clip_min, clip_max)`` (official defaults 0 and 5: a domain's weight
   never *decreases* through its own score, only through renormalisation);
4. exponentiated-gradient step: ``log α_d ← log α_d + η s_d``, then softmax;
5. smoothing toward uniform: ``α ← (1 - ε) α + ε / D`` (official default ε = 0);

and the run's output for the main training run is the average of α_1..α_T (:attr:`average_weights`).
``η`` (``step_size``) stands for the official ``η_t / μ``: the proxy's current learning rate over the
Bregman coefficient μ (official 5e-4 / 0.01 = 0.05 at the peak learning rate); here it is a constant.
Deviations from the official code are listed in ``docs/reweighting.md``.
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

__all__ = ["DoGEReweighter", "doge_scores"]

Target = Literal["others", "validation"]


def doge_scores(
    grads: torch.Tensor,
    *,
    target: Target = "others",
    val_grad: torch.Tensor | None = None,
    clip_min: float = 0.0,
    clip_max: float = 5.0,
) -> torch.Tensor:
    """Tensor[D] DoGE's clipped, norm-normalised alignment scores (steps 1-3 of the module doc).

    Args:
        grads: Tensor[D, d] domain-mean gradient features (zero rows for domains never seen).
        target: ``"others"`` (alignment with the other domains) or ``"validation"`` (with ``val_grad``).
        val_grad: Tensor[d] the target gradient (``target="validation"``).
        clip_min, clip_max: clipping range of the normalised scores.
    """
    g = grads.to(DTYPE)
    # rescale by the largest entry first: the scores are scale-covariant and huge features stay finite
    scale = g.abs().max().clamp_min(1e-300)
    if target == "others":
        g = g / scale
        gram = g @ g.T
        raw = gram.sum(dim=1) - torch.diagonal(gram)
    elif target == "validation":
        if val_grad is None:
            raise ValueError("doge: target='validation' needs DomainStats.val_grad (the target gradient features).")
        v = val_grad.to(DTYPE).reshape(-1)
        scale = torch.maximum(scale, v.abs().max().clamp_min(1e-300))
        g, v = g / scale, v / scale
        raw = g @ v
    else:
        raise ConfigError(f"doge: target={target!r} must be 'others' or 'validation'.")
    mean_norm = g.norm(dim=1).mean()
    # raw / (mean norm + 1e-6) in the original units (raw scales with scale², the norm with scale)
    scores = scale * raw / (mean_norm + 1e-6 / scale)
    return torch.nan_to_num(scores, posinf=clip_max, neginf=clip_min).clamp(min=clip_min, max=clip_max)


@register_reweighter("doge")
class DoGEReweighter(ScheduledReweighter):
    """DoGE domain weights (Fan et al., arXiv 2310.15393); see the module doc for the update.

    Needs ``stats.grad`` (Tensor[D, d] summed per-example gradient features per domain) every update
    and, with ``target="validation"``, ``stats.val_grad`` at least at the first update.

    Args:
        domains: domain names in id order.
        step_size: η in ``log α ← log α + η s`` (the official ``η_t / μ``; 0.05 = 5e-4 / 0.01).
        target: ``"others"`` (default, DoGE's universal generalisation) or ``"validation"``.
        clip_min: lower clip of the normalised scores (official 0).
        clip_max: upper clip of the normalised scores (official 5).
        smoothing: ε of the mix with uniform after each update (official 0).
        initial_weights: α_0 as a list / ``{domain: w}`` dict (normalised); default uniform.
        mode: where the weights act; default ``"loss"`` (the proxy trains on α-weighted losses).
        update_every: the rule runs once every this many ``update`` calls on the summed window.
    """

    default_mode: Mode = "loss"
    #: The training loop must fill ``DomainStats.grad`` (and ``val_grad`` for ``target="validation"``).
    needs_grad: ClassVar[bool] = True

    @property
    def needs_val_grad(self) -> bool:
        """Only ``target="validation"`` reads the validation gradient; ``"others"`` (the default) never does."""
        return self.target == "validation"

    def __init__(
        self,
        domains: list[str],
        *,
        step_size: float = 0.05,
        target: Target = "others",
        clip_min: float = 0.0,
        clip_max: float = 5.0,
        smoothing: float = 0.0,
        initial_weights: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None,
        mode: Mode | None = None,
        update_every: int = 1,
    ) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        checks = [
            (0 <= step_size < float("inf"), f"step_size={step_size} must be finite and >= 0"),
            (target in ("others", "validation"), f"target={target!r} must be 'others' or 'validation'"),
            (clip_min <= clip_max, f"clip_min={clip_min} must be <= clip_max={clip_max}"),
            (0.0 <= smoothing <= 1.0, f"smoothing={smoothing} must lie in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"doge: {msg}.")
        self.step_size = float(step_size)
        self.target: Target = target
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.smoothing = float(smoothing)
        if initial_weights is not None:
            self._weights = normalize(
                as_domain_vector(initial_weights, self.domains, "initial_weights"), "initial_weights"
            )
        self._initial = self._weights.clone()
        self._weight_sum = torch.zeros(self.num_domains, dtype=DTYPE)
        self._grads: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._scores = torch.zeros(self.num_domains, dtype=DTYPE)

    @property
    def average_weights(self) -> torch.Tensor:
        """Tensor[D] the mean of α_1..α_T over the updates so far (α_0 before any): the main run's mixture."""
        if self.num_updates == 0:
            return self._initial.clone()
        avg = self._weight_sum / self.num_updates
        return avg / avg.sum()

    @property
    def scores(self) -> torch.Tensor:
        """Tensor[D] the clipped, normalised alignment scores of the last update."""
        return self._scores.clone()

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        if stats.grad is None:
            raise ValueError(
                "doge needs DomainStats.grad (Tensor[D, d] summed per-example gradient features per domain); "
                "the training loops fill it because doge declares needs_grad."
            )
        grad = stats.grad.to(DTYPE).reshape(self.num_domains, -1)
        mean = grad / stats.counts.to(DTYPE).clamp_min(1).unsqueeze(-1)
        if self._grads is None:
            self._grads = torch.zeros_like(mean)
        elif self._grads.shape != mean.shape:
            raise ValueError(
                f"doge: DomainStats.grad has shape {tuple(mean.shape)} but earlier updates had "
                f"{tuple(self._grads.shape)}; keep the gradient feature dimension fixed during a run."
            )
        self._grads = torch.where((stats.counts > 0).unsqueeze(-1), mean, self._grads)
        if stats.val_grad is not None:
            val = stats.val_grad.to(DTYPE)
            self._val = val.mean(dim=0) if val.dim() == 2 else val.reshape(-1)
        self._scores = doge_scores(
            self._grads, target=self.target, val_grad=self._val, clip_min=self.clip_min, clip_max=self.clip_max
        )
        new = smooth(exponentiated_step(self._weights, self.step_size * self._scores), self.smoothing)
        self._weight_sum = self._weight_sum + new
        return new

    def _extra_log(self) -> dict[str, float]:
        out = {f"score/{d}": float(v) for d, v in zip(self.domains, self._scores.tolist())}
        out.update({f"avg_weights/{d}": float(v) for d, v in zip(self.domains, self.average_weights.tolist())})
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "initial": self._initial.clone(),
            "weight_sum": self._weight_sum.clone(),
            "grads": None if self._grads is None else self._grads.clone(),
            "val": None if self._val is None else self._val.clone(),
            "scores": self._scores.clone(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._initial = state["initial"].to(DTYPE).clone()
        self._weight_sum = state["weight_sum"].to(DTYPE).clone()
        self._grads = None if state["grads"] is None else state["grads"].to(DTYPE).clone()
        self._val = None if state["val"] is None else state["val"].to(DTYPE).clone()
        self._scores = state["scores"].to(DTYPE).clone()
