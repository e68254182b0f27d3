"""One online selection step: pool -> the selector's features -> (all-gather) -> select -> local slice.

:class:`OnlineSelector` glues a model-free :class:`mixsel.selection.Selector` to a model. It
computes exactly the features the selector declares in ``requires`` (one no-grad forward of the
pool for scalar signals and LM-head factors; gradient kernels from ``mixsel.features``), builds a
:class:`mixsel.selection.Pool`, calls ``select`` and records diagnostics and timings:

* ``select/conflicts``: conflicting gradient pairs among the selected examples (PartitionSel Fig. 3)
  whenever a Gram matrix is available, and ``select/conflicts_random`` for a random subset of the
  same size as a reference;
* ``select/grad_mismatch``: relative error of the selected batch gradient against the pool's;
* ``time/features``, ``time/solver``: seconds spent computing features and selecting;
  ``time/forward``: the part of ``time/features`` spent in the plain pool (and validation-anchor)
  forward passes that capture activations and logits (CoLM's SPSA perturbed forwards count as
  feature work, not here).

Under ``torchrun`` every rank holds the same global pool (the same seeded sampler) and
``mode`` says who computes what (see ``docs/distributed.md``):

* ``"global"``: every rank computes the features of the whole pool and runs the same selection;
  rank ``r`` trains on entries ``r, r + W, ...`` of it. Exact, and redundant feature work.
* ``"gather"``: rank ``r`` computes features only for its strided shard of the pool; the small
  per-example features (scalar signals, ``hidden``, projected ``grads``, SPSA coefficients) are
  all-gathered, the Gram quantities (``gram``, ``val_scores``, ``val_gram``) are rebuilt from the
  gathered projected gradients, and every rank runs the same selection on the same tensors. Each
  rank trains on the selected examples of its own shard (examples never move between ranks).
* ``"local"``: rank ``r`` selects its share of ``k`` from its own shard only. Cheapest; the
  selection differs from a 1-process run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from mixsel import seeding
from mixsel.config import FeatureConfig
from mixsel.distributed import World, all_gather_cat
from mixsel.errors import ConfigError
from mixsel.metrics import conflicting_pairs, gradient_mismatch
from mixsel.selection.base import Pool, Selector, reference_features
from mixsel.types import FEATURE_NAMES, GRADIENT_FEATURES, PAIRWISE_FEATURES, SCALAR_FEATURES, Selection

__all__ = ["MODES", "OnlineSelector", "StepResult", "resolve_features"]

log = logging.getLogger(__name__)

MODES = ("global", "gather", "local")
_GRAM = PAIRWISE_FEATURES  # rebuilt from gathered projected grads in "gather" mode


@dataclass
class StepResult:
    """What one selection step returns.

    Attributes:
        selection: the global selection (indices into the pool), identical on every rank. In
            ``"local"`` mode it is every rank's picks concatenated in rank order.
        metrics: diagnostics and timings.
        local: the part of the selection this rank trains on (indices into the pool).
    """

    selection: Selection
    metrics: dict[str, float]
    local: Selection | None = None


def resolve_features(features: FeatureConfig, selector: Selector) -> FeatureConfig:
    """``features`` with ``source="auto"`` and ``normalize=None`` replaced by the selector's reference.

    PartitionSel, per_domain and GREATS declare the L2-normalised gradients of the last transformer
    blocks (PartitionSel's code, arXiv 2606.07954); every other selector the exact LM-head
    gradients, unnormalised (:func:`mixsel.selection.base.reference_features`).
    """
    ref = reference_features(selector)
    return dataclasses.replace(
        features,
        source=ref["source"] if features.source == "auto" else features.source,
        normalize=bool(ref["normalize"]) if features.normalize is None else bool(features.normalize),
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 1}


def _take(selection: Selection, keep: torch.Tensor | slice) -> Selection:
    return Selection(selection.indices[keep], selection.weights[keep])


class OnlineSelector:
    """Runs a selector on a candidate pool with the features it needs.

    Args:
        selector: any registered selector.
        features: how gradient features are computed (source layer, projection, normalisation,
            number of validation anchors); ``"auto"`` / ``None`` fields take the selector's
            reference (:func:`resolve_features`).
        num_domains: number of domains in the mixture.
        seed: base seed for per-step randomness (identical on every rank).
        diagnostics: compute a Gram matrix for the conflict/mismatch diagnostics even when the
            selector does not need one (costs a gradient-feature pass).
        mode: ``"global"``, ``"gather"`` or ``"local"`` (module docstring); all three coincide on
            one process except that ``"gather"`` always goes through projected gradients.
        world: this process's rank and the world size (default: one process).
        source_sizes: LongTensor[num_domains] training examples per domain in the whole dataset,
            handed to the selector in every pool (``Pool.source_sizes``; CoLM's small sources).
    """

    def __init__(
        self,
        selector: Selector,
        features: FeatureConfig,
        num_domains: int,
        *,
        seed: int = 0,
        diagnostics: bool = False,
        mode: str = "global",
        world: World | None = None,
        source_sizes: torch.Tensor | None = None,
    ) -> None:
        unknown = set(selector.requires) - FEATURE_NAMES
        if unknown:
            raise ConfigError(f"selector {selector.name!r} requires unknown features {sorted(unknown)}")
        if mode not in MODES:
            raise ConfigError(f"train.distributed_selection={mode!r} is not one of {MODES}")
        self.selector = selector
        self.features = resolve_features(features, selector)
        self.num_domains = num_domains
        self.source_sizes = None if source_sizes is None else torch.as_tensor(source_sizes, dtype=torch.long)
        if getattr(selector, "needs_source_sizes", False) and self.source_sizes is None:
            raise ConfigError(
                f"selector {selector.name!r} decides its small sources from the dataset's per-domain sizes: pass "
                "source_sizes=<training examples per domain> to OnlineSelector, or set its small_sources=[...] "
                "or small_from='pool'"
            )
        self.seed = seed
        self.diagnostics = diagnostics
        self.mode = mode
        self.world = world or World()
        self.step = 0
        self.forward_seconds = 0.0  # the plain pool forward inside time/features, reset every step
        if self.needed() & GRADIENT_FEATURES:
            f = self.features
            where = f"the last {f.blocks or 'all'} transformer blocks" if f.source == "blocks" else f.source
            log.info(
                "selector %r: gradient features from %s (%s), %s; %d validation anchors per step (%s)",
                selector.name,
                where,
                "exact" if f.projection_dim is None else f"projected to {f.projection_dim}",
                "L2-normalised" if f.normalize else "unnormalised",
                f.val_anchors,
                f.anchor_sampling,
            )
        if mode == "gather" and self.needed() & (_GRAM | {"grads"}) and features.projection_dim is None:
            why = "diagnostics" if not selector.requires & (_GRAM | {"grads"}) else f"selector {selector.name!r}"
            raise ConfigError(
                f"train.distributed_selection='gather' all-gathers per-example gradient features, and {why} "
                f"needs {sorted(self.needed() & (_GRAM | {'grads'}))}: set selection.features.projection_dim "
                "(e.g. 256) so each rank sends [n_local, projection_dim], or use distributed_selection='global'"
            )

    def needed(self) -> set[str]:
        need = set(self.selector.requires)
        if self.diagnostics:
            need.add("gram")
        return need

    # ---- features -------------------------------------------------------------------------------

    def _model_features(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        val_batch: dict[str, torch.Tensor] | None,
        need: set[str],
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The tensors in ``need`` for ``batch`` (CPU), and the SPSA estimate when ``zo_grads`` is needed."""
        out: dict[str, torch.Tensor] = {}
        spsa = None
        if not need:
            return out, spsa
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            grad_need = need & GRADIENT_FEATURES
            scalar_need = need & SCALAR_FEATURES
            if grad_need:
                from mixsel.features import pool_gradient_features

                if grad_need & {"val_scores", "val_gram"} and val_batch is None:
                    raise ConfigError("the selector needs validation gradients but no validation anchors were given")
                # one pass gives the gradient features and the scalar signals of the same forward
                both = scalar_need if self.features.source == "lm_head" else scalar_need - {"hidden"}
                feats, info = pool_gradient_features(
                    model,
                    _to(batch, device),
                    _to(val_batch, device) if val_batch is not None else None,
                    source=self.features.source,
                    modules=self.features.modules,
                    blocks=self.features.blocks,
                    projection_dim=self.features.projection_dim,
                    normalize=self.features.normalize,
                    seed=self.seed,
                    need=tuple(sorted(grad_need | both)),
                    return_info=True,
                )
                self.forward_seconds += info.get("time_forward", 0.0)
                out.update({k: v.detach().cpu() for k, v in feats.items()})
                scalar_need = scalar_need - both
            if scalar_need:
                from mixsel.features import forward_stats

                t0 = time.perf_counter()
                stats = forward_stats(model, _to(batch, device), hidden="hidden" in scalar_need)
                self.forward_seconds += time.perf_counter() - t0
                out.update({k: v.detach().cpu() for k, v in stats.items() if k in scalar_need and torch.is_tensor(v)})
            if "zo_grads" in need:
                from mixsel.features import spsa_features

                # one direction for the whole run (CoLM's code seeds it once, arXiv 2407.19580 Sec. 4.3), so
                # the selector's Adam moments track one coordinate system; "per_step" draws a fresh one.
                # The seed is the same on every rank, so the directions are too.
                fixed = self.features.zo_direction == "fixed"
                spsa = spsa_features(
                    model,
                    _to(batch, device),
                    module=self.features.zo_module,
                    eps=self.features.zo_eps,
                    seed=seeding.spsa_seed(self.seed, 0 if fixed else self.step),
                )
                spsa = dataclasses.replace(spsa, coefficients=spsa.coefficients.detach().cpu())
        finally:
            model.train(was_training)
        return out, spsa

    def compute_features(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], val_batch: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """Every feature the selector (and diagnostics) need, for all rows of ``batch``."""
        need = self.needed()
        out, spsa = self._model_features(model, batch, val_batch, need)
        if spsa is not None:
            out["zo_grads"] = spsa.features()
        missing = self.selector.requires - set(out)
        if missing:
            raise RuntimeError(f"features {sorted(missing)} were not produced for selector {self.selector.name!r}")
        return out

    def gather_features(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        val_batch: dict[str, torch.Tensor] | None,
        rows: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``"gather"`` mode: features of this rank's rows, all-gathered into pool order.

        Args:
            batch: the whole pool (every rank holds its tokens; only its own rows are run).
            rows: every rank's pool rows, in rank order (``rows[rank]`` are computed here).

        Per-example tensors cross ranks; the pairwise ones are rebuilt identically on every rank:
        ``gram = G G^T``, ``val_scores = G V^T``, ``val_gram = V V^T`` with ``G`` the gathered
        projected pool gradients and ``V`` the validation anchors' (computed on every rank: a few rows).
        """
        need = self.needed()
        grams = need & _GRAM
        local_need = (need - _GRAM) | ({"grads"} if grams else set())
        mine = rows[self.world.rank]
        out, spsa = self._model_features(model, _rows(batch, mine), None, local_need)
        order = torch.cat(rows)  # gathered row j is pool row order[j]
        full: dict[str, torch.Tensor] = {}
        for name, value in out.items():
            gathered = all_gather_cat(value.contiguous())
            full[name] = torch.empty_like(gathered).index_copy_(0, order, gathered)
        if spsa is not None:
            coeffs = all_gather_cat(spsa.coefficients.contiguous())
            coeffs = torch.empty_like(coeffs).index_copy_(0, order, coeffs)
            full["zo_grads"] = dataclasses.replace(spsa, coefficients=coeffs).features()
        if grams:
            grads = full["grads"]
            if "gram" in grams:
                full["gram"] = grads @ grads.T
            if grams & {"val_scores", "val_gram"}:
                if val_batch is None:
                    raise ConfigError("the selector needs validation gradients but no validation anchors were given")
                vgrads = self._model_features(model, val_batch, None, {"grads"})[0]["grads"]
                if "val_scores" in grams:
                    full["val_scores"] = grads @ vgrads.T
                if "val_gram" in grams:
                    full["val_gram"] = vgrads @ vgrads.T
            if "grads" not in need:
                del full["grads"]
        missing = self.selector.requires - set(full)
        if missing:
            raise RuntimeError(f"features {sorted(missing)} were not produced for selector {self.selector.name!r}")
        return full

    # ---- one step -------------------------------------------------------------------------------

    def _shards(self, n: int) -> list[torch.Tensor]:
        from mixsel.data.sampler import CandidateSampler

        every = torch.arange(n)
        return [CandidateSampler.shard(every, r, self.world.world_size) for r in range(self.world.world_size)]

    def _select(
        self,
        feats: dict[str, torch.Tensor],
        domains: torch.Tensor,
        k: int,
        *,
        step: int,
        lr: float,
        seed: int,
        val_batch: dict[str, torch.Tensor] | None,
        domain_weights: torch.Tensor | None,
    ) -> tuple[Selection, Pool]:
        pool = Pool(
            domains=domains.cpu(),
            num_domains=self.num_domains,
            features={k_: v for k_, v in feats.items() if k_ in self.selector.requires},
            domain_weights=domain_weights,
            step=step,
            lr=lr,
            seed=seed,
            val_domains=val_batch["domain_ids"].cpu() if val_batch is not None and "domain_ids" in val_batch else None,
            source_sizes=self.source_sizes,
        )
        return self.selector.select(pool, k), pool

    def __call__(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        k: int,
        *,
        step: int,
        lr: float = 1.0,
        val_batch: dict[str, torch.Tensor] | None = None,
        domain_weights: torch.Tensor | None = None,
    ) -> StepResult:
        t0 = time.perf_counter()
        self.step = step
        self.forward_seconds = 0.0
        rank, world = self.world.rank, self.world.world_size
        n = batch["input_ids"].shape[0]
        if self.mode != "global" and n < world:
            raise ConfigError(
                f"train.pool_size={n} is smaller than the world size {world}: distributed_selection="
                f"{self.mode!r} gives every rank a shard of the pool"
            )
        kw = {"step": step, "lr": lr, "val_batch": val_batch, "domain_weights": domain_weights}
        if self.mode == "local":
            if k < world:
                raise ConfigError(
                    f"train.batch_size={k} is smaller than the world size {world}: in "
                    "distributed_selection='local' mode every rank selects at least one example"
                )
            mine = self._shards(n)[rank]
            k_local = k // world + (1 if rank < k % world else 0)
            feats = self.compute_features(model, _rows(batch, mine), val_batch)
            t1 = time.perf_counter()
            # rank 0 keeps the base seed, so one process reproduces "global"; other ranks draw their own
            chosen, pool = self._select(
                feats, batch["domain_ids"][mine], k_local, seed=seeding.rank_seed(self.seed, rank), **kw
            )
            local = Selection(mine[chosen.indices], chosen.weights.to(torch.float32))
            selection = Selection(all_gather_cat(local.indices), all_gather_cat(local.weights))
        else:
            shards = self._shards(n) if self.mode == "gather" else None
            if shards is not None:
                feats = self.gather_features(model, batch, val_batch, shards)
            else:
                feats = self.compute_features(model, batch, val_batch)
            t1 = time.perf_counter()
            chosen, pool = self._select(feats, batch["domain_ids"], k, seed=self.seed, **kw)
            selection = chosen
            if shards is not None:  # "gather": the chosen examples of this rank's own shard
                local = _take(chosen, torch.isin(chosen.indices, shards[rank]))
            else:  # "global": a strided share of the selection
                local = _take(chosen, slice(rank, None, world))
        t2 = time.perf_counter()
        metrics: dict[str, float] = {
            "time/features": t1 - t0,
            "time/forward": self.forward_seconds,
            "time/solver": t2 - t1,
        }
        metrics.update(self._diagnostics(feats, chosen, pool))
        return StepResult(selection, metrics, local)

    def _diagnostics(self, feats: dict[str, torch.Tensor], chosen: Selection, pool: Pool) -> dict[str, float]:
        """Gradient-conflict and mismatch diagnostics of the selection against the pool it came from."""
        metrics: dict[str, float] = {}
        gram = feats.get("gram")
        if gram is not None:
            metrics["select/conflicts"] = float(conflicting_pairs(gram, chosen.indices))
            ref = torch.randperm(pool.size, generator=pool.generator(seeding.Salt.CONFLICTS_REFERENCE))[: len(chosen)]
            metrics["select/conflicts_random"] = float(conflicting_pairs(gram, ref))
            metrics["select/grad_mismatch"] = gradient_mismatch(gram, chosen.indices, chosen.weights)
            metrics["select/grad_mismatch_random"] = gradient_mismatch(gram, ref)
        if chosen.residual is not None:
            metrics["select/residual"] = float(chosen.residual)
        return metrics
