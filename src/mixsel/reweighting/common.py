"""Bookkeeping shared by the reweighters: mode, update schedule, stats checks, state and logging.

Schedule (all reweighters): the training loop may call ``update(stats)`` **every step**. The
statistics of consecutive calls are accumulated (counts, loss sums and gradient sums are added;
the latest validation gradient is kept) and the update rule runs once every ``update_every``
calls, on the accumulated window. With ``update_every=1`` (the default) every call updates, so a
caller that prefers to own the schedule simply calls ``update`` when it wants an update.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, get_args

import torch

from mixsel.errors import ConfigError, DataError
from mixsel.reweighting.base import Mode
from mixsel.reweighting.simplex import DTYPE
from mixsel.types import DomainStats

__all__ = ["ScheduledReweighter", "accumulate_stats", "check_stats"]

_MODES = get_args(Mode)


def _bad_domains(x: torch.Tensor, domains: list[str]) -> list[str]:
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    return [domains[i] for i in torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()]


def check_stats(stats: DomainStats, domains: list[str], *, who: str) -> None:
    """Validate one step's statistics against the domain list.

    Raises:
        ValueError: wrong shapes, negative counts, or NaN/inf entries (naming the domain and the fix).
    """
    num = len(domains)
    if stats.counts.numel() != num or stats.loss_sum.numel() != num:
        raise ValueError(
            f"{who}: DomainStats has counts of length {stats.counts.numel()} and loss_sum of length "
            f"{stats.loss_sum.numel()}, but the reweighter has {num} domains {domains}; build the stats "
            "with one entry per domain in the same id order."
        )
    if bool((stats.counts < 0).any()):
        raise ValueError(f"{who}: DomainStats.counts has negative entries {stats.counts.tolist()}.")
    fields: list[tuple[str, torch.Tensor | None]] = [
        ("counts", stats.counts),
        ("loss_sum", stats.loss_sum),
        ("ref_loss_sum", stats.ref_loss_sum),
        ("grad", stats.grad),
        ("token_counts", stats.token_counts),
        ("excess_sum", stats.excess_sum),
    ]
    for field, value in fields:
        if value is None:
            continue
        if value.shape[0] != num:
            raise ValueError(
                f"{who}: DomainStats.{field} has leading size {value.shape[0]}, expected {num} (one row per domain)."
            )
        bad = _bad_domains(value, domains)
        if bad:
            raise ValueError(
                f"{who}: DomainStats.{field} is NaN or infinite for domain(s) {bad}. The training (or "
                "reference) loss diverged or a batch of that domain was empty/corrupt; lower the learning "
                "rate, enable gradient clipping, or drop those examples before calling update()."
            )
    if stats.val_grad is not None and not bool(torch.isfinite(stats.val_grad).all()):
        raise ValueError(
            f"{who}: DomainStats.val_grad has NaN or infinite entries; recompute the validation gradient "
            "(check the validation loss for divergence) before calling update()."
        )


def accumulate_stats(acc: DomainStats | None, new: DomainStats) -> DomainStats:
    """Sum two windows of statistics (float64 copies); keeps the latest ``val_grad`` and ``step``."""

    def add(a: torch.Tensor | None, b: torch.Tensor | None, field: str) -> torch.Tensor | None:
        if a is None and b is None:
            return None
        if a is None or b is None:
            raise ValueError(
                f"DomainStats.{field} is given in some calls of an update window and missing in others; "
                "pass it on every call (or on none)."
            )
        # Saturate instead of overflowing to inf when summing huge (finite) values.
        return torch.nan_to_num(a + b.to(DTYPE), posinf=1e300, neginf=-1e300)

    def copy(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(DTYPE).clone()

    if acc is None:
        return DomainStats(
            counts=copy(new.counts),  # type: ignore[arg-type]
            loss_sum=copy(new.loss_sum),  # type: ignore[arg-type]
            ref_loss_sum=copy(new.ref_loss_sum),
            grad=copy(new.grad),
            val_grad=copy(new.val_grad),
            step=int(new.step),
            token_counts=copy(new.token_counts),
            excess_sum=copy(new.excess_sum),
        )
    return DomainStats(
        counts=add(acc.counts, new.counts.detach(), "counts"),  # type: ignore[arg-type]
        loss_sum=add(acc.loss_sum, new.loss_sum.detach(), "loss_sum"),  # type: ignore[arg-type]
        ref_loss_sum=add(acc.ref_loss_sum, _detach(new.ref_loss_sum), "ref_loss_sum"),
        grad=add(acc.grad, _detach(new.grad), "grad"),
        val_grad=copy(new.val_grad) if new.val_grad is not None else acc.val_grad,
        step=int(new.step),
        token_counts=add(acc.token_counts, _detach(new.token_counts), "token_counts"),
        excess_sum=add(acc.excess_sum, _detach(new.excess_sum), "excess_sum"),
    )


def _detach(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def _stats_to_state(stats: DomainStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "counts": stats.counts.clone(),
        "loss_sum": stats.loss_sum.clone(),
        "ref_loss_sum": None if stats.ref_loss_sum is None else stats.ref_loss_sum.clone(),
        "grad": None if stats.grad is None else stats.grad.clone(),
        "val_grad": None if stats.val_grad is None else stats.val_grad.clone(),
        "step": stats.step,
        "token_counts": None if stats.token_counts is None else stats.token_counts.clone(),
        "excess_sum": None if stats.excess_sum is None else stats.excess_sum.clone(),
    }


def _stats_from_state(state: dict[str, Any] | None) -> DomainStats | None:
    if state is None:
        return None
    return DomainStats(
        counts=state["counts"].clone(),
        loss_sum=state["loss_sum"].clone(),
        ref_loss_sum=None if state["ref_loss_sum"] is None else state["ref_loss_sum"].clone(),
        grad=None if state["grad"] is None else state["grad"].clone(),
        val_grad=None if state["val_grad"] is None else state["val_grad"].clone(),
        step=int(state["step"]),
        token_counts=None if state.get("token_counts") is None else state["token_counts"].clone(),
        excess_sum=None if state.get("excess_sum") is None else state["excess_sum"].clone(),
    )


class ScheduledReweighter:
    """Shared implementation of the :class:`~mixsel.reweighting.Reweighter` bookkeeping.

    Subclasses implement :meth:`_apply` (the update rule on one accumulated window) and may extend
    :meth:`_extra_state` / :meth:`_load_extra_state` and :meth:`_extra_log`.

    Attributes:
        domains: domain names in id order.
        mode: where the weights act: ``"sampling"``, ``"loss"`` or ``"both"``.
        update_every: the update rule runs once every this many ``update`` calls.
        num_calls: ``update`` calls so far; ``num_updates``: applied updates so far.
    """

    name: str
    default_mode: Mode = "sampling"
    #: ``DomainStats.ref_loss_sum`` is required (a reference model's losses).
    needs_reference: ClassVar[bool] = False
    #: ``DomainStats.grad`` (and ``val_grad`` on update steps) is required.
    needs_grad: ClassVar[bool] = False

    @property
    def needs_val_grad(self) -> bool:
        """``DomainStats.val_grad`` is read on update steps (every gradient reweighter unless it says otherwise)."""
        return self.needs_grad

    def __init__(self, domains: list[str], *, mode: Mode | None = None, update_every: int = 1) -> None:
        domains = [str(d) for d in domains]
        if not domains:
            raise ConfigError("domains is empty; pass the domain names in id order, e.g. ['web', 'code'].")
        if len(set(domains)) != len(domains):
            raise ConfigError(f"domains {domains} has duplicate names; domain names must be unique.")
        mode = self.default_mode if mode is None else mode
        if mode not in _MODES:
            raise ConfigError(f"mode={mode!r} is not one of {list(_MODES)}.")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every={update_every!r} must be a positive integer (1 = every call).")
        self.domains = domains
        self.mode: Mode = mode
        self.update_every = update_every
        self.num_calls = 0
        self.num_updates = 0
        self.last_step: int | None = None
        self._weights = torch.full((len(domains),), 1.0 / len(domains), dtype=DTYPE)
        self._pending: DomainStats | None = None

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def proposal_weights(self) -> torch.Tensor | None:
        """The natural mixture (``None``); reweighters that sample from another proposal override it."""
        return None

    @property
    def average_weights(self) -> torch.Tensor | None:
        """``None``: only reweighters that track a time average (DoReMi) override it."""
        return None

    @property
    def weights(self) -> torch.Tensor:
        """Tensor[D] float64 current domain weights (non-negative, summing to one); a copy."""
        return self._weights.clone()

    def update(self, stats: DomainStats) -> torch.Tensor:
        """Accumulate ``stats``; every ``update_every``-th call apply the update rule.

        Args:
            stats: per-domain statistics of one step, already all-reduced across ranks.

        Returns:
            Tensor[D] the (possibly unchanged) current weights.

        Raises:
            ValueError: malformed statistics, or NaN/inf values (the message names the domain).
        """
        check_stats(stats, self.domains, who=f"{type(self).__name__}.update")
        self._pending = accumulate_stats(self._pending, stats)
        self.num_calls += 1
        if self.num_calls % self.update_every == 0:
            window, self._pending = self._pending, None
            new = self._apply(window)
            self._weights = self._check_weights(new)
            self.num_updates += 1
            self.last_step = window.step
        return self.weights

    def _apply(self, stats: DomainStats) -> torch.Tensor:  # pragma: no cover - overridden
        return self._weights

    def _check_weights(self, w: torch.Tensor) -> torch.Tensor:
        w = w.to(DTYPE)
        ok = bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and math.isclose(float(w.sum()), 1.0)
        if not ok:  # pragma: no cover - guards against an internal bug, never user input
            raise RuntimeError(f"{type(self).__name__} produced invalid weights {w.tolist()}.")
        return w / w.sum()

    def log_dict(self) -> dict[str, float]:
        """``{"weights/<domain>": w_d, ...}`` (plus method diagnostics) for logging after each update."""
        out = {f"weights/{d}": float(w) for d, w in zip(self.domains, self._weights.tolist())}
        out.update(self._extra_log())
        return out

    def _extra_log(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (weights, schedule counters, the open window)."""
        return {
            "name": getattr(self, "name", type(self).__name__),
            "domains": list(self.domains),
            "weights": self._weights.clone(),
            "num_calls": self.num_calls,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "pending": _stats_to_state(self._pending),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; further updates then match an uninterrupted run exactly.

        Raises:
            ValueError: the state was saved for other domains.
        """
        if list(state["domains"]) != self.domains:
            raise DataError(
                f"state_dict was saved for domains {state['domains']} but this reweighter has "
                f"{self.domains}; build the reweighter with the same domains in the same order."
            )
        self._weights = state["weights"].to(DTYPE).clone()
        self.num_calls = int(state["num_calls"])
        self.num_updates = int(state["num_updates"])
        self.last_step = state["last_step"]
        self._pending = _stats_from_state(state["pending"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(domains={self.domains}, mode={self.mode!r}, "
            f"update_every={self.update_every}, weights={[round(w, 4) for w in self._weights.tolist()]})"
        )
