"""The step engine: one optimiser step of online selection and reweighting, for every training loop.

``mixsel train`` and the Hugging Face / TRL trainers run the same method because they run this code;
a loop owns only its I/O, the forward/backward calls, the optimiser and logging::

    plan = engine.plan(model, step=step, lr=lr)           # pool -> features -> selection -> weights
    for micro in plan.micro_batches:                       # this rank's share, in micro-batches
        logits = model(**micro.batch.forward_inputs(device)).logits
        engine.loss(plan, micro, logits).backward()        # one normaliser: global over ranks and micro-batches
    optimizer.step()
    report = engine.finish(model, plan)                    # domain statistics -> reweighter update

Pieces:

* :class:`Batch`: padded rows (``input_ids``, ``attention_mask``, ``labels``), their domain ids and
  the dataset rows they came from;
* :class:`OnlineReweighter`: beside :class:`mixsel.step.OnlineSelector`, the loop-agnostic side of a
  :class:`mixsel.reweighting.Reweighter`: where its weights act (pool sampling, loss multipliers),
  on which steps its statistics are computed, and which ones (it computes only what the method
  declares: reference losses for ``needs_reference``, domain gradients for ``needs_grad``, the
  validation gradient for ``needs_val_grad``);
* :class:`Engine`: draws the step's pool from a :class:`mixsel.data.CandidateSampler` by the
  current sampling weights, runs the selection, weights the selected examples, computes the
  weighted loss of each micro-batch and, after the optimiser step, the statistics that update the
  reweighter.

The loss of a step is ``sum_i w_i l_i / sum_i w_i`` over the whole selection (every rank, every
micro-batch): ``l_i`` the mean cross-entropy over example ``i``'s target tokens and ``w_i`` its
selection weight (when the method trains on them) times the reweighter's loss multiplier
``D alpha_{d_i}`` (in ``loss`` mode). Each micro-batch contributes its part, multiplied by the world
size because data parallelism averages the ranks' gradients.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixsel import bookkeeping
from mixsel.config import ExperimentConfig, ReweightingConfig
from mixsel.distributed import World, all_reduce_sum
from mixsel.errors import ConfigError, DataError, DivergedError, OptionError
from mixsel.registry import get_reweighter
from mixsel.step import OnlineSelector, StepResult
from mixsel.types import DomainStats

__all__ = [
    "Batch",
    "Engine",
    "MicroBatch",
    "OnlineReweighter",
    "StepPlan",
    "StepReport",
    "build_engine",
    "build_reweighter",
    "reweighter_update_every",
    "weighted_loss",
]


@dataclass
class Batch:
    """Padded rows with their domains: what a pool, a selection or a micro-batch holds.

    Attributes:
        input_ids: LongTensor[n, T].
        attention_mask: LongTensor[n, T].
        labels: LongTensor[n, T], -100 where no loss is taken.
        domain_ids: LongTensor[n] the domain of each row.
        ids: LongTensor[n] each row's index in its dataset split (None when unknown).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor
    ids: torch.Tensor | None = None

    @classmethod
    def from_dict(cls, batch: dict[str, Any], ids: torch.Tensor | None = None) -> Batch:
        """From a collated dict (``input_ids``, ``attention_mask``, ``labels``, ``domain_ids``)."""
        domains = torch.as_tensor(batch["domain_ids"]).long()
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        return cls(batch["input_ids"], mask, batch["labels"], domains, ids)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, idx: torch.Tensor | slice) -> Batch:
        """The rows ``idx`` (a LongTensor of positions or a slice), in that order."""
        if torch.is_tensor(idx):
            idx = idx.cpu()
        return Batch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.labels[idx],
            self.domain_ids[idx],
            None if self.ids is None else self.ids[idx],
        )

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (on ``device`` when given)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def forward_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``: what a forward whose loss the engine computes takes (no
        ``labels``, so the model does not compute a loss of its own)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The model inputs and ``domain_ids``: the batch form :class:`mixsel.step.OnlineSelector` reads."""
        return {**self.model_inputs(), "domain_ids": self.domain_ids}


@dataclass
class MicroBatch:
    """One forward/backward of a step: the rows, their loss weights and their place in the step.

    Attributes:
        batch: the rows.
        weights: Float32 Tensor[len(batch)] the rows' loss weights ``w_i``.
        index: position of this micro-batch in the step.
        padding: a stand-in row of weight 0 for a rank with fewer selected rows than the loop's
            micro-batches (``gather`` selection under a Trainer): run, but it adds nothing to the
            gradient and is never counted in the statistics.
    """

    batch: Batch
    weights: torch.Tensor
    index: int
    padding: bool = False


@dataclass
class StepPlan:
    """What :meth:`Engine.plan` decided for one optimiser step (identical selection on every rank).

    Attributes:
        step: the optimiser step (0-based).
        pool_ids: LongTensor[n] the pool's rows in the training split.
        pool: the pool.
        result: the selection step's result (global selection, this rank's share, diagnostics).
        chosen: LongTensor[k_rank] this rank's selected rows (positions in the pool), in training order.
        weights: Tensor[k_rank] their loss weights.
        total_weight: the selected weight summed over every rank (the loss normaliser).
        micro_batches: this rank's selected rows in micro-batches.
        domain_weights: Tensor[D] the reweighter's weights in force during the step.
        capture: DoGraph's gradient capture around the step's backward, or None.
        token_losses: per-token losses of each micro-batch, recorded by :meth:`Engine.loss`.
        seconds: time spent planning (pool, features, selection).
        trained_grad: Tensor[D, d] the trained rows' summed domain gradients from a separate pass before
            the optimiser step (:meth:`OnlineReweighter.before_update`), when no capture took them.
    """

    step: int
    pool_ids: torch.Tensor
    pool: Batch
    result: StepResult
    chosen: torch.Tensor
    weights: torch.Tensor
    total_weight: torch.Tensor
    micro_batches: list[MicroBatch]
    domain_weights: torch.Tensor
    capture: Any = None
    token_losses: list[torch.Tensor | None] = field(default_factory=list)
    seconds: float = 0.0
    trained_grad: torch.Tensor | None = None
    seconds_before_update: float = 0.0

    @property
    def trained(self) -> Batch:
        """This rank's selected rows, in training order."""
        return self.pool.rows(self.chosen)

    def backward_context(self) -> Any:
        """Wrap the step's backward passes in it (DoGraph's gradient capture; a no-op otherwise)."""
        return self.capture if self.capture is not None else contextlib.nullcontext()


@dataclass
class StepReport:
    """What :meth:`Engine.finish` measured.

    Attributes:
        stats: the step's per-domain statistics, summed over ranks.
        metrics: ``train/loss``, ``select/frac/<domain>``, ``weights/<domain>``, the selection
            diagnostics and timings (``time/select``, ``time/reweight``).
        updated: the reweighter consumed the statistics this step.
    """

    stats: DomainStats
    metrics: dict[str, float]
    updated: bool


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, total_weight: torch.Tensor, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch's part of the step loss ``sum_i w_i l_i / sum_i w_i`` (times ``world_size``).

    Args:
        logits: Tensor[b, T, V] the model's outputs on the micro-batch.
        labels: LongTensor[b, T] (-100 = no loss).
        weights: Tensor[b] the rows' loss weights ``w_i``.
        total_weight: the sum of ``w`` over the whole step, all ranks.
        world_size: data-parallel ranks (their gradients are averaged).

    Returns:
        ``(loss, per_example, token_losses)``: the part to backpropagate, Tensor[b] the per-example
        losses ``l_i`` (in the graph) and Tensor[b, T - 1] per-token losses (in the graph).
    """
    from mixsel.features.loss import target_mask, token_losses

    tok = token_losses(logits.float(), labels)
    per_ex = tok.sum(1) / target_mask(labels).sum(1).clamp_min(1)
    device = per_ex.device
    loss = (per_ex * weights.to(device)).sum().div(total_weight.to(device)).mul(world_size)
    return loss, per_ex, tok


class OnlineReweighter:
    """A reweighter in a training loop: where its weights act, and the statistics it is fed.

    Args:
        reweighter: any registered reweighter (built with ``update_every=1`` when ``amortize``).
        update_every: steps per reweighting update (``reweighting.update_every``).
        amortize: compute the costly statistics only on the last step of each window.
        grad_rows: ``"trained"`` (DoGraph's domain gradients captured in the training backward) or
            ``"pool"`` (a separate pass over this rank's share of the pool).
        grad_source: ``selection.features.source`` (``auto`` = the LM head) for the domain gradients.
        grad_modules: ``selection.features.modules``.
        projection_dim: dimension of the projected domain gradients (``reweighting.projection_dim``).
        val_per_domain: validation rows per domain of the validation gradient.
        seed: the projection seed.
        reference: a frozen reference model (DoReMi), or None.
    """

    def __init__(
        self,
        reweighter: Any,
        *,
        update_every: int = 1,
        amortize: bool = False,
        grad_rows: str = "trained",
        grad_source: str = "auto",
        grad_modules: Sequence[str] | None = None,
        projection_dim: int = 512,
        val_per_domain: int = 4,
        seed: int = 0,
        reference: torch.nn.Module | None = None,
    ) -> None:
        if grad_rows not in ("trained", "pool"):
            raise ConfigError(f"reweighting.grad_rows={grad_rows!r} is not one of 'trained', 'pool'")
        self.reweighter = reweighter
        self.update_every = update_every
        self.amortize = amortize and update_every > 1
        self.grad_rows = grad_rows
        self.grad_kw: dict[str, Any] = {
            "source": grad_source,
            "modules": grad_modules,
            "projection_dim": projection_dim,
            "seed": seed,
        }
        self.val_per_domain = val_per_domain
        self.reference = reference
        # False where the loop's loss is not Engine.loss (TRL's): DoGraph's trained-row gradients then
        # come from a separate pass over the trained rows
        self.capture_in_backward = True

    @property
    def weights(self) -> torch.Tensor:
        """Tensor[D] the current domain weights."""
        return self.reweighter.weights

    @property
    def needs_grad(self) -> bool:
        return bool(self.reweighter.needs_grad)

    @property
    def needs_val_grad(self) -> bool:
        """The update reads ``DomainStats.val_grad`` (DoGraph; DoGE only with ``target="validation"``)."""
        return bool(getattr(self.reweighter, "needs_val_grad", self.reweighter.needs_grad))

    def mixture(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(sampling, loss)`` weights in force (:func:`mixsel.bookkeeping.mixture_weights`)."""
        return bookkeeping.mixture_weights(self.reweighter)

    def is_stats_step(self, step: int) -> bool:
        return bookkeeping.is_stats_step(step, self.update_every, self.amortize)

    def _trained_grads(self, step: int) -> bool:
        """Whether ``step`` feeds the reweighter domain gradients of the trained rows."""
        return self.needs_grad and self.is_stats_step(step) and self.grad_rows == "trained"

    def capture(self, model: torch.nn.Module, step: int) -> Any:
        """A gradient capture for the step's backward when the domain gradients come from it, else None."""
        if self._trained_grads(step) and self.capture_in_backward:
            return bookkeeping.gradient_capture(model, **self.grad_kw)
        return None

    def statistics(
        self,
        model: torch.nn.Module,
        plan: StepPlan,
        *,
        val_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        val_domains: torch.Tensor,
        world: World,
        micro_batch_size: int | None,
    ) -> DomainStats:
        """This rank's per-domain statistics of the step's trained rows (not yet summed over ranks)."""
        from mixsel.features.loss import target_mask

        trained = plan.trained
        stats_step = self.is_stats_step(plan.step)
        losses = [t for t in plan.token_losses if t is not None]
        ref = None
        if self.reference is not None and stats_step:
            ref = bookkeeping.reference_losses(self.reference, trained.model_inputs(), micro_batch_size)
        num_domains = len(self.reweighter.domains)
        mask = target_mask(trained.labels).cpu()
        if losses and losses[0].dim() == 1:  # per-example losses (the TRL route): compare per-example means
            ref = None if ref is None else ref.sum(1) / mask.sum(1).clamp_min(1)
            mask = None
        stats = bookkeeping.domain_stats(
            trained.domain_ids,
            torch.cat(losses) if losses else torch.zeros(0),
            num_domains,
            step=plan.step,
            ref_losses=ref,
            mask=mask,
        )
        if self.needs_grad and stats_step:
            self._domain_gradients(stats, model, plan, val_batch, val_domains, world)
        return stats

    def _domain_gradients(
        self,
        stats: DomainStats,
        model: torch.nn.Module,
        plan: StepPlan,
        val_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        val_domains: torch.Tensor,
        world: World,
    ) -> None:
        """Fill ``stats.grad`` (and ``stats.val_grad`` when the method reads it on this step)."""
        num_domains = len(stats.counts)
        with_val = self.needs_val_grad and (bookkeeping.is_update_step(plan.step, self.update_every) or self.amortize)
        vb = None
        if with_val:
            vb = val_batch(bookkeeping.balanced_rows(val_domains, num_domains, self.val_per_domain))
        if self.grad_rows == "pool":  # a separate pass over this rank's share of the pool
            rows = torch.arange(len(plan.pool))[world.rank :: world.world_size]
            share = plan.pool.rows(rows)
            stats.grad, stats.val_grad = bookkeeping.domain_gradients(
                model, share.model_inputs(), share.domain_ids, num_domains, val_batch=vb, **self.grad_kw
            )
            return
        if plan.capture is not None:  # the trained rows, captured in the backward
            trained = plan.trained
            stats.grad = bookkeeping.captured_domain_gradients(
                plan.capture, trained.model_inputs(), trained.domain_ids, num_domains, model=model, **self.grad_kw
            )
        else:  # a separate pass over the trained rows (before the update, where the loop called before_update)
            stats.grad = plan.trained_grad if plan.trained_grad is not None else self._trained_pass(model, plan)
        if vb is not None:
            stats.val_grad = bookkeeping.validation_gradient(model, vb, **self.grad_kw)

    def _trained_pass(self, model: torch.nn.Module, plan: StepPlan) -> torch.Tensor:
        trained = plan.trained
        num_domains = len(self.reweighter.domains)
        grads, _ = bookkeeping.domain_gradients(
            model, trained.model_inputs(), trained.domain_ids, num_domains, val_batch=None, **self.grad_kw
        )
        return grads

    def before_update(self, model: torch.nn.Module, plan: StepPlan) -> None:
        """Between the backward passes and the optimiser step: the trained rows' domain gradients when the
        loop's loss is not :meth:`Engine.loss` (no capture), so they are taken at the model the step
        differentiated, as the capture takes them."""
        if self._trained_grads(plan.step) and plan.capture is None:
            plan.trained_grad = self._trained_pass(model, plan)

    def update(self, stats: DomainStats, step: int) -> bool:
        """Feed the reweighter on its statistics steps; returns whether it consumed ``stats``."""
        if self.is_stats_step(step):
            self.reweighter.update(stats)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return self.reweighter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reweighter.load_state_dict(state)


class Engine:
    """One optimiser step of online selection and reweighting (module docstring).

    Args:
        selector: the :class:`mixsel.step.OnlineSelector` (features, distributed mode, diagnostics).
        reweighting: the :class:`OnlineReweighter`.
        sampler: draws each step's pool of training rows by the sampling weights.
        train_batch: collates training rows (LongTensor of split indices) into a padded dict with
            ``domain_ids``.
        val_batch: the same for validation rows.
        val_domains: LongTensor[m] the domain of every validation row.
        domains: domain names in id order.
        batch_size: examples selected per step, over all ranks (``k``).
        micro_batch_size: rows per forward/backward on a rank.
        use_weights: the loss applies the selection weights
            (:func:`mixsel.bookkeeping.resolve_use_weights`).
        val_anchors: validation anchors per step (``selection.features.val_anchors``).
        anchor_sampling: ``"uniform"`` or ``"balanced"``.
        seed: the run's seed (anchors).
        world: this process's rank and the world size.
        train_sources: where training rows came from (``TokenizedSplit.source_of``: ``file:line``...),
            for ``selections.jsonl``; None = unknown.
    """

    def __init__(
        self,
        selector: OnlineSelector,
        reweighting: OnlineReweighter,
        sampler: Any,
        *,
        train_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        val_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        val_domains: torch.Tensor,
        domains: Sequence[str],
        batch_size: int,
        micro_batch_size: int,
        use_weights: bool,
        val_anchors: int,
        anchor_sampling: str = "uniform",
        seed: int = 0,
        world: World | None = None,
        train_sources: Callable[[torch.Tensor], list[str]] | None = None,
    ) -> None:
        self.selector = selector
        self.reweighting = reweighting
        self.sampler = sampler
        self.train_batch = train_batch
        self.val_batch = val_batch
        self.val_domains = torch.as_tensor(val_domains, dtype=torch.long)
        self.domains = list(domains)
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.use_weights = use_weights
        self.val_anchors = val_anchors
        self.anchor_sampling = anchor_sampling
        self.seed = seed
        self.world = world or World()
        self.train_sources = train_sources

    def anchors(self, step: int) -> dict[str, torch.Tensor] | None:
        """The step's validation anchors (collated), or None when the validation split is empty."""
        if self.val_domains.numel() == 0:
            return None
        rows = bookkeeping.draw_anchors(
            self.val_domains, self.val_anchors, seed=self.seed, step=step, sampling=self.anchor_sampling
        )
        return self.val_batch(rows)

    def _micro_batches(self, pool: Batch, chosen: torch.Tensor, w: torch.Tensor, count: int | None) -> list[MicroBatch]:
        """This rank's rows in micro-batches: of ``micro_batch_size`` rows, or exactly ``count`` of them
        (a Trainer's accumulation), as even as possible, a rank with fewer rows than ``count`` getting
        stand-in rows of weight 0 (:attr:`MicroBatch.padding`)."""
        if count is None:
            mb = self.micro_batch_size
            return [
                MicroBatch(pool.rows(chosen[s : s + mb]), w[s : s + mb], i)
                for i, s in enumerate(range(0, len(chosen), mb))
            ]
        out = []
        for i, (rows, weights) in enumerate(zip(torch.tensor_split(chosen, count), torch.tensor_split(w, count))):
            if len(rows):
                out.append(MicroBatch(pool.rows(rows), weights, i))
            else:
                stand_in = chosen[:1] if len(chosen) else torch.zeros(1, dtype=torch.long)
                out.append(MicroBatch(pool.rows(stand_in), torch.zeros(1), i, padding=True))
        return out

    def plan(self, model: torch.nn.Module, *, step: int, lr: float, micro_batches: int | None = None) -> StepPlan:
        """Draw the step's pool, select ``batch_size`` of it, and weight this rank's share.

        Args:
            model: the model being trained (features are computed on it; pass the unwrapped module).
            step: the optimiser step (0-based; seeds the anchors and the selection).
            lr: the learning rate of the step (GREATS' look-ahead).
            micro_batches: cut this rank's share into exactly this many micro-batches (a Trainer's
                gradient accumulation); None = micro-batches of ``micro_batch_size`` rows.
        """
        t0 = time.perf_counter()
        domain_weights = self.reweighting.weights
        sampling, loss_weights = self.reweighting.mixture()
        pool_ids = self.sampler.draw(sampling)
        pool = Batch.from_dict(self.train_batch(pool_ids), ids=pool_ids)
        result = self.selector(
            model,
            pool.as_dict(),
            self.batch_size,
            step=step,
            lr=lr,
            val_batch=self.anchors(step),
            domain_weights=domain_weights,
        )
        mine = result.local if result.local is not None else result.selection
        chosen = mine.indices
        w = bookkeeping.example_weights(
            mine, pool.domain_ids[chosen], use_weights=self.use_weights, loss_weights=loss_weights
        )
        total = all_reduce_sum(w.sum().clone()).clamp_min(1e-12)
        micro = self._micro_batches(pool, chosen, w, micro_batches)
        capture = self.reweighting.capture(model, step)
        if any(m.padding for m in micro):  # the capture would count the stand-in rows: take a separate pass
            capture = None
        plan = StepPlan(
            step=step,
            pool_ids=pool_ids,
            pool=pool,
            result=result,
            chosen=chosen,
            weights=w,
            total_weight=total,
            micro_batches=micro,
            domain_weights=domain_weights.clone(),
            capture=capture,
        )
        plan.token_losses = [None] * len(micro)
        plan.seconds = time.perf_counter() - t0
        return plan

    def loss(self, plan: StepPlan, micro: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
        """The micro-batch's part of the step loss (:func:`weighted_loss`); records its per-token losses.

        Raises:
            DivergedError: a selected row's loss is not finite (the caller says how to resume).
        """
        labels = micro.batch.labels.to(logits.device)
        loss, per_ex, tok = weighted_loss(logits, labels, micro.weights, plan.total_weight, self.world.world_size)
        if not torch.isfinite(per_ex).all():
            raise DivergedError(
                f"training diverged: non-finite loss at step {plan.step + 1} (domains "
                f"{micro.batch.domain_ids.tolist()})"
            )
        if micro.padding:  # a stand-in row: run, never counted
            return loss
        if plan.capture is not None:
            plan.capture.watch(per_ex)
        plan.token_losses[micro.index] = tok.detach().cpu()
        return loss

    def record(self, plan: StepPlan, micro: MicroBatch, losses: torch.Tensor) -> None:
        """Record a micro-batch's losses computed by a loop's own loss (Tensor[b] per example, or per token)."""
        if not micro.padding:
            plan.token_losses[micro.index] = losses.detach().cpu()

    def before_update(self, model: torch.nn.Module, plan: StepPlan) -> None:
        """Call after the step's backward passes, before the optimiser step (loops whose loss is their own)."""
        t0 = time.perf_counter()
        self.reweighting.before_update(model, plan)
        plan.seconds_before_update = time.perf_counter() - t0

    def finish(self, model: torch.nn.Module, plan: StepPlan) -> StepReport:
        """After the optimiser step: domain statistics (summed over ranks) -> the reweighter; metrics."""
        t0 = time.perf_counter()
        stats = self.reweighting.statistics(
            model,
            plan,
            val_batch=self.val_batch,
            val_domains=self.val_domains,
            world=self.world,
            micro_batch_size=self.micro_batch_size,
        )
        bookkeeping.reduce_stats(stats, all_reduce_sum)
        updated = self.reweighting.update(stats, plan.step)
        captured = plan.capture.seconds if plan.capture is not None else 0.0
        metrics: dict[str, float] = dict(plan.result.metrics)
        metrics["train/loss"] = float(stats.loss_sum.sum() / stats.counts.sum().clamp_min(1))
        metrics["time/select"] = plan.seconds
        metrics["time/reweight"] = time.perf_counter() - t0 + captured + plan.seconds_before_update
        metrics["time/capture"] = captured
        metrics.update(
            {k: v for k, v in self.reweighting.reweighter.log_dict().items() if not k.startswith("weights/")}
        )
        comp = stats.counts / stats.counts.sum().clamp_min(1)
        for d, name in enumerate(self.domains):
            metrics[f"select/frac/{name}"] = float(comp[d])
            metrics[f"weights/{name}"] = float(plan.domain_weights[d])
        return StepReport(stats, metrics, updated)

    def selections_record(self, plan: StepPlan) -> dict[str, Any]:
        """One ``selections.jsonl`` line: the step and every rank's picks: ``examples`` (rows of the training
        split), ``pool_index`` (positions in the pool), ``weights`` (selection weights), ``domains`` and,
        when known, ``sources`` (where each row came from, e.g. ``train.jsonl:17``)."""
        sel = plan.result.selection
        picked = plan.pool.rows(sel.indices)
        examples = plan.pool_ids[sel.indices]
        record = {
            "step": plan.step + 1,
            "examples": examples.tolist(),
            "pool_index": sel.indices.tolist(),
            "weights": sel.weights.tolist(),
            "domains": [self.domains[d] for d in picked.domain_ids.tolist()],
        }
        if self.train_sources is not None:
            record["sources"] = self.train_sources(examples)
        return record

    def state_dict(self) -> dict[str, Any]:
        """The sampler's, selector's and reweighter's states (exact resume)."""
        return {
            "sampler": self.sampler.state_dict(),
            "selector": self.selector.selector.state_dict(),
            "reweighter": self.reweighting.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], selector_state: dict[str, Any] | None = None) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.selector.selector.load_state_dict(state["selector"] if selector_state is None else selector_state)
        self.reweighting.load_state_dict(state["reweighter"])


# ---- built from the configuration (every loop builds its engine here) -------------------------------


def _weights_from(options: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """Resolve ``reweighting.options.weights_from`` (the two-stage DoReMi recipe) into ``weights``.

    ``weights_from`` names a finished run's ``result.json`` (or its folder): its ``average_weights``
    (DoReMi's stage-one output, Xie et al. 2023, arXiv 2305.10429, Sec. 2) or else its
    ``final_weights`` become the ``weights`` option, as a ``{domain: weight}`` mapping, so a domain
    missing from the file fails loudly in the reweighter instead of being silently misaligned.
    """
    source = options.pop("weights_from", None)
    if source is None:
        return options
    if "weights" in options:
        raise ConfigError("reweighting.options has both weights and weights_from: keep one")
    path = Path(source)
    if path.is_dir():
        path = path / "result.json"
    if not path.exists():
        raise FileNotFoundError(
            f"reweighting.options.weights_from={source!r}: {path} not found; point it at a finished run's "
            "result.json (e.g. runs/doremi_proxy/result.json)"
        )
    result = json.loads(path.read_text())
    values = result.get("average_weights") or result.get("final_weights")
    if values is None or "domains" not in result:
        raise DataError(f"{path} has no domains / average_weights / final_weights: is it a mixsel result.json?")
    loaded = dict(zip(result["domains"], values, strict=True))
    missing = [d for d in domains if d not in loaded]
    if missing:
        raise DataError(f"{path} has no weights for domains {missing} of this run (it has {sorted(loaded)})")
    return {**options, "weights": {d: float(loaded[d]) for d in domains}}


def reweighter_update_every(rc: ReweightingConfig) -> int:
    """The ``update_every`` a reweighter is built with: ``reweighting.update_every``, or 1 with
    ``reweighting.amortize`` (the loop then decides the update steps and the reweighter updates on every
    call it gets)."""
    return 1 if rc.amortize and rc.update_every > 1 else rc.update_every


def build_reweighter(rc: ReweightingConfig, domains: list[str]) -> Any:
    """The ``reweighting.method`` reweighter with its ``reweighting.options`` (one clear line for a bad one)."""
    options = _weights_from(dict(rc.options), domains)
    try:
        return get_reweighter(rc.method, domains=domains, update_every=reweighter_update_every(rc), **options)
    except OptionError as err:  # an unknown or missing keyword option
        raise ConfigError(
            f"reweighting.options for {rc.method!r}: {err}; docs/reweighting.md lists the options"
        ) from None


def build_engine(
    cfg: ExperimentConfig,
    selector: Any,
    domains: Sequence[str],
    *,
    train_domains: torch.Tensor | None,
    train_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    val_domains: torch.Tensor,
    val_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    world: World | None = None,
    reference: torch.nn.Module | None = None,
    reweighter: Any = None,
    train_sources: Callable[[torch.Tensor], list[str]] | None = None,
    sampler: Any = None,
) -> Engine:
    """The :class:`Engine` of an experiment config: what ``mixsel train`` and the trainers both run.

    Args:
        cfg: the experiment (``train.batch_size``, ``pool_size``, ``micro_batch_size``,
            ``distributed_selection``, ``selection.*``, ``reweighting.*``, ``seed``).
        selector: the built selector (``get_selector(cfg.selection.method, **options)``).
        domains: domain names in id order.
        train_domains: LongTensor[N] domain of every training row (the sampler draws from them); None only
            with ``sampler`` (a stream, whose rows are not known up front: no ``Pool.source_sizes``).
        train_batch, val_batch: collate training / validation rows (see :class:`Engine`).
        val_domains: LongTensor[m] domain of every validation row.
        world: rank and world size.
        reference: DoReMi's frozen reference model.
        reweighter: a built reweighter to use instead of ``build_reweighter(cfg.reweighting, domains)``.
        train_sources: where training rows came from, for ``selections.jsonl`` (see :class:`Engine`).
        sampler: draws the pools (``draw``, ``state_dict``, ``load_state_dict``); None = a
            :class:`mixsel.data.sampler.CandidateSampler` over ``train_domains`` (``train.pool_size``, the
            seed). ``mixsel train`` passes a :class:`mixsel.data.streaming.StreamingSampler` with ``data.streaming``.
    """
    from mixsel.data.sampler import CandidateSampler

    world = world or World()
    domains = list(domains)
    if train_domains is None and sampler is None:
        raise DataError("build_engine needs train_domains (the domain of every training row) or a sampler")
    if train_domains is not None:
        train_domains = torch.as_tensor(train_domains, dtype=torch.long)
    fc, rc = cfg.selection.features, cfg.reweighting
    online = OnlineSelector(
        selector,
        fc,
        len(domains),
        seed=cfg.seed,
        diagnostics=cfg.selection.diagnostics,
        mode=cfg.train.distributed_selection,
        world=world,
        source_sizes=None if train_domains is None else bookkeeping.source_sizes(train_domains, len(domains)),
    )
    reweighting = OnlineReweighter(
        reweighter if reweighter is not None else build_reweighter(rc, domains),
        update_every=rc.update_every,
        amortize=rc.amortize,
        grad_rows=rc.grad_rows,
        grad_source=fc.source,
        grad_modules=fc.modules,
        projection_dim=rc.projection_dim,
        val_per_domain=rc.val_per_domain,
        seed=cfg.seed,
        reference=reference,
    )
    if sampler is None:
        sampler = CandidateSampler(train_domains, cfg.train.pool_size, seed=cfg.seed, num_domains=len(domains))
    return Engine(
        online,
        reweighting,
        sampler,
        train_batch=train_batch,
        val_batch=val_batch,
        val_domains=val_domains,
        domains=domains,
        batch_size=cfg.train.batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        use_weights=bookkeeping.resolve_use_weights(selector, cfg.selection.use_weights),
        val_anchors=fc.val_anchors,
        anchor_sampling=fc.anchor_sampling,
        seed=cfg.seed,
        world=world,
        train_sources=train_sources,
    )
