"""One online selection step: pool -> the selector's features -> select.

:class:`OnlineSelector` glues a model-free :class:`mixsel.selection.Selector` to a model. It
computes exactly the features the selector declares in ``requires`` (one no-grad forward of the
pool for scalar signals and LM-head factors; gradient kernels from ``mixsel.features``), builds a
:class:`mixsel.selection.Pool`, calls ``select`` and records diagnostics and timings:

* ``select/conflicts``: conflicting gradient pairs among the selected examples (PartitionSel Fig. 3)
  whenever a Gram matrix is available, and ``select/conflicts_random`` for a random subset of the
  same size as a reference;
* ``select/grad_mismatch``: relative error of the selected batch gradient against the pool's;
* ``time/features``, ``time/solver``: seconds spent computing features and selecting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from mixsel.config import FeatureConfig
from mixsel.metrics import conflicting_pairs, gradient_mismatch
from mixsel.selection.base import FEATURE_NAMES, Pool, Selector
from mixsel.types import Selection

__all__ = ["OnlineSelector", "StepResult"]

log = logging.getLogger(__name__)

_SCALAR = {"loss", "confidence", "perplexity", "completion_length", "hidden"}
_GRADIENT = {"grads", "gram", "val_scores", "val_gram", "grad_norm"}


@dataclass
class StepResult:
    selection: Selection
    metrics: dict[str, float]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


class OnlineSelector:
    """Runs a selector on a candidate pool with the features it needs.

    Args:
        selector: any registered selector.
        features: how gradient features are computed (source layer, projection, normalisation,
            number of validation anchors).
        num_domains: number of domains in the mixture.
        seed: base seed for per-step randomness (identical on every rank).
        diagnostics: compute a Gram matrix for the conflict/mismatch diagnostics even when the
            selector does not need one (costs a gradient-feature pass).
    """

    def __init__(
        self,
        selector: Selector,
        features: FeatureConfig,
        num_domains: int,
        *,
        seed: int = 0,
        diagnostics: bool = False,
        domain_names: list[str] | None = None,
        zo_module: str | None = None,
        zo_eps: float = 1e-3,
    ) -> None:
        unknown = set(selector.requires) - FEATURE_NAMES
        if unknown:
            raise ValueError(f"selector {selector.name!r} requires unknown features {sorted(unknown)}")
        self.selector = selector
        self.features = features
        self.num_domains = num_domains
        self.seed = seed
        self.diagnostics = diagnostics
        self.domain_names = domain_names
        self.zo_module = zo_module
        self.zo_eps = zo_eps
        self.step = 0
        self.last_info: dict[str, Any] = {}

    def needed(self) -> set[str]:
        need = set(self.selector.requires)
        if self.diagnostics:
            need.add("gram")
        return need

    def compute_features(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], val_batch: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        need = self.needed()
        out: dict[str, torch.Tensor] = {}
        if not need:
            return out
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            grad_need = need & _GRADIENT
            scalar_need = need & _SCALAR
            if grad_need:
                from mixsel.features import pool_gradient_features

                if grad_need & {"val_scores", "val_gram"} and val_batch is None:
                    raise ValueError("the selector needs validation gradients but no validation anchors were given")
                # one pass gives the gradient features and the scalar signals of the same forward
                both = scalar_need if self.features.source == "lm_head" else scalar_need - {"hidden"}
                feats, info = pool_gradient_features(
                    model,
                    _to(batch, device),
                    _to(val_batch, device) if val_batch is not None else None,
                    source=self.features.source,
                    modules=self.features.modules,
                    projection_dim=self.features.projection_dim,
                    normalize=self.features.normalize,
                    seed=self.seed,
                    need=tuple(sorted(grad_need | both)),
                    return_info=True,
                )
                self.last_info = info
                out.update({k: v.detach().cpu() for k, v in feats.items()})
                scalar_need = scalar_need - both
            if scalar_need:
                from mixsel.features import forward_stats

                stats = forward_stats(model, _to(batch, device), hidden="hidden" in scalar_need)
                out.update({k: v.detach().cpu() for k, v in stats.items() if k in scalar_need and torch.is_tensor(v)})
            if "zo_grads" in need:
                from mixsel.features import spsa_features

                # a fresh direction every step: CoLM's smoothed zeroth-order estimate (seed 004, Eq. 6)
                est = spsa_features(
                    model, _to(batch, device), module=self.zo_module, eps=self.zo_eps, seed=self.seed * 7919 + self.step
                )
                out["zo_grads"] = est.features().detach().cpu()
        finally:
            model.train(was_training)
        missing = self.selector.requires - set(out)
        if missing:
            raise RuntimeError(f"features {sorted(missing)} were not produced for selector {self.selector.name!r}")
        return out

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
        feats = self.compute_features(model, batch, val_batch)
        t1 = time.perf_counter()
        pool = Pool(
            domains=batch["domain_ids"].cpu(),
            num_domains=self.num_domains,
            features={k_: v for k_, v in feats.items() if k_ in self.selector.requires},
            domain_weights=domain_weights,
            step=step,
            lr=lr,
            seed=self.seed,
            domain_names=self.domain_names,
            val_domains=val_batch["domain_ids"].cpu() if val_batch is not None and "domain_ids" in val_batch else None,
        )
        selection = self.selector.select(pool, k)
        t2 = time.perf_counter()
        metrics: dict[str, float] = {"time/features": t1 - t0, "time/solver": t2 - t1}
        gram = feats.get("gram")
        if gram is not None:
            metrics["select/conflicts"] = float(conflicting_pairs(gram, selection.indices))
            ref = torch.randperm(pool.size, generator=pool.generator(97))[: len(selection)]
            metrics["select/conflicts_random"] = float(conflicting_pairs(gram, ref))
            metrics["select/grad_mismatch"] = gradient_mismatch(gram, selection.indices, selection.weights)
            metrics["select/grad_mismatch_random"] = gradient_mismatch(gram, ref)
        if selection.residual is not None:
            metrics["select/residual"] = float(selection.residual)
        return StepResult(selection, metrics)
