"""The bridge the training step calls: every gradient feature of a pool from one pass over it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mixsel import seeding
from mixsel.features.grads import (
    block_modules,
    capture_linear_factors,
    factor_gram,
    factor_sq_norms,
    find_last_module,
    materialize_grads,
)
from mixsel.features.loss import GradFactors, forward_stats
from mixsel.features.projection import KroneckerProjector
from mixsel.types import GRADIENT_FEATURES, SCALAR_FEATURES

__all__ = ["pool_gradient_features"]

log = logging.getLogger(__name__)

SOURCES = ("lm_head", "linear", "blocks")


def _factors(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    source: str,
    modules: Sequence[str | torch.nn.Module],
    hidden: bool,
) -> tuple[list[GradFactors], dict[str, torch.Tensor]]:
    if source == "lm_head":
        stats = forward_stats(model, batch, hidden=hidden, factors=True)
        return [stats.pop("lm_head")], stats
    return capture_linear_factors(model, batch, modules)


def _project(factors: list[GradFactors], dim: int, seed: int) -> torch.Tensor:
    """Kronecker-project each module's gradients to ``dim // len(factors)`` coordinates (exact if smaller)."""
    per = max(1, dim // len(factors))
    parts = []
    for k, f in enumerate(factors):
        if per >= f.dim:
            log.info("module %d has %d <= %d gradient coordinates: kept exact", k, f.dim, per)
            parts.append(materialize_grads(f))
            continue
        p, q = f.out_grads.shape[-1], f.inputs_with_bias().shape[-1]
        parts.append(KroneckerProjector(p, q, per, seed=seeding.projection_seed(seed, k)).project_factors(f))
    return torch.cat(parts, dim=1)


def _sum_gram(
    fs: list[GradFactors], gs: list[GradFactors] | None, method: str, infos: list[dict[str, Any]]
) -> torch.Tensor:
    total = None
    for i, f in enumerate(fs):
        k, info = factor_gram(f, None if gs is None else gs[i], method=method)
        infos.append(info)
        total = k if total is None else total + k
    assert total is not None
    return total


def _check_request(
    need: set[str],
    source: str,
    val_batch: dict[str, torch.Tensor] | None,
    projection_dim: int | None,
) -> None:
    unknown = need - GRADIENT_FEATURES - SCALAR_FEATURES
    if unknown:
        valid = sorted(GRADIENT_FEATURES | SCALAR_FEATURES)
        raise ValueError(f"need has unknown names {sorted(unknown)}; valid: {valid}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {SOURCES}")
    if source != "lm_head" and "hidden" in need:
        raise ValueError("need='hidden' is computed with source='lm_head'; call forward_stats(hidden=True)")
    if need & {"val_scores", "val_gram"} and val_batch is None:
        raise ValueError("need asks for val_scores/val_gram: pass val_batch (the validation anchors)")
    if projection_dim is not None and projection_dim <= 0:
        raise ValueError(f"projection_dim must be positive or None, got {projection_dim}")


def _source_modules(
    model: torch.nn.Module,
    source: str,
    modules: str | torch.nn.Module | Sequence[str | torch.nn.Module] | None,
    blocks: int,
) -> list[str | torch.nn.Module]:
    if source == "blocks":
        return list(block_modules(model, blocks))
    if source != "linear":
        return []
    if modules is None:
        return [find_last_module(model, "v_proj")]
    if isinstance(modules, (str, torch.nn.Module)):
        return [modules]
    return list(modules)


def _explicit_features(
    fs: list[GradFactors],
    gs: list[GradFactors] | None,
    need: set[str],
    *,
    projection_dim: int | None,
    normalize: bool,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Per-example feature vectors (exact, materialised, or Kronecker-projected); the rest by products."""

    def vectors(factors: list[GradFactors]) -> torch.Tensor:
        if projection_dim:
            return _project(factors, projection_dim, seed)
        return torch.cat([materialize_grads(f) for f in factors], 1)

    feats = vectors(fs)
    vfeats = vectors(gs) if gs is not None else None
    norms = feats.norm(dim=1)
    if normalize:
        feats = feats / norms.clamp(min=1e-30).unsqueeze(1)
        if vfeats is not None:
            vfeats = vfeats / vfeats.norm(dim=1).clamp(min=1e-30).unsqueeze(1)
    out: dict[str, torch.Tensor] = {}
    if "grads" in need:
        out["grads"] = feats
    if "gram" in need:
        out["gram"] = feats @ feats.T
    if vfeats is not None and "val_scores" in need:
        out["val_scores"] = feats @ vfeats.T
    if vfeats is not None and "val_gram" in need:
        out["val_gram"] = vfeats @ vfeats.T
    if "grad_norm" in need:
        out["grad_norm"] = norms
    return out


def _factor_features(
    fs: list[GradFactors],
    gs: list[GradFactors] | None,
    need: set[str],
    *,
    normalize: bool,
    method: str,
    infos: list[dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """Gram quantities straight from the factors (ghost or materialised inner products, no feature vectors)."""
    gram = _sum_gram(fs, None, method, infos) if "gram" in need else None
    if gram is not None:
        sq = gram.diagonal().clone()
    elif normalize or "grad_norm" in need:
        sq = torch.stack([factor_sq_norms(f) for f in fs]).sum(0)
    else:
        sq = None
    norms = None if sq is None else sq.clamp(min=0).sqrt()
    val_gram = _sum_gram(gs, None, method, infos) if gs is not None and ("val_gram" in need or normalize) else None
    vnorms = None if val_gram is None else val_gram.diagonal().clamp(min=0).sqrt()
    scale = None if norms is None else 1.0 / norms.clamp(min=1e-30)
    vscale = None if vnorms is None else 1.0 / vnorms.clamp(min=1e-30)

    def scaled(k: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
        return k * left[:, None] * right[None, :] if normalize else k  # type: ignore[index]

    out: dict[str, torch.Tensor] = {}
    if gram is not None:
        out["gram"] = scaled(gram, scale, scale)
    if "val_scores" in need and gs is not None:
        out["val_scores"] = scaled(_sum_gram(fs, gs, method, infos), scale, vscale)
    if "val_gram" in need and val_gram is not None:
        out["val_gram"] = scaled(val_gram, vscale, vscale)
    if "grad_norm" in need and norms is not None:
        out["grad_norm"] = norms
    return out


def pool_gradient_features(
    model: torch.nn.Module,
    pool_batch: dict[str, torch.Tensor],
    val_batch: dict[str, torch.Tensor] | None = None,
    *,
    source: str = "lm_head",
    modules: str | torch.nn.Module | Sequence[str | torch.nn.Module] | None = None,
    blocks: int = 3,
    projection_dim: int | None = None,
    normalize: bool = False,
    seed: int = 0,
    need: Iterable[str] = ("gram", "val_scores"),
    method: str = "auto",
    return_info: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-example gradient features of a pool (and validation anchors), computing only what is needed.

    One pass over the pool (a no-grad forward for the LM head; forward + one backward to the chosen
    layers for ``source="linear"`` / ``"blocks"``) and, when a validation quantity is asked for, one
    over ``val_batch``.

    Args:
        model: a Hugging Face causal LM (peft-wrapped is fine), dropout off.
        pool_batch: the candidate pool, dict(input_ids, attention_mask, labels).
        val_batch: validation anchors, needed for ``val_scores``/``val_gram``.
        source: ``"lm_head"`` (gradient w.r.t. the output embedding), ``"blocks"`` (the linear
            layers, or LoRA A/B under peft, of the last ``blocks`` transformer blocks: PartitionSel's
            reference features, :func:`mixsel.features.grads.block_modules`) or ``"linear"``
            (``modules``).
        modules: for ``"linear"``, module names/modules; default the last V-projection (its LoRA B under
            peft), via :func:`find_last_module`.
        blocks: for ``"blocks"``, how many blocks counted from the last (0 = all).
        projection_dim: project to this many coordinates (Kronecker-factored, seeded; split evenly over
            modules) instead of using exact gradients.
        normalize: L2-normalise the gradient features (cosine Gram, as PartitionSel's code does).
            ``grad_norm`` stays the norm before normalisation.
        seed: projection seed (identical on every rank).
        need: any of ``grads`` [n, d], ``gram`` [n, n], ``val_scores`` [n, m], ``val_gram`` [m, m],
            ``grad_norm`` [n], and the free by-products of the same forward ``loss``, ``confidence``,
            ``perplexity``, ``completion_length``, ``hidden`` [n, H] (``hidden`` with ``lm_head`` only).
        method: exact Gram backend, ``"auto"`` | ``"ghost"`` | ``"materialize"``.
        return_info: also return an info dict: which backends ran, and ``time_forward``, the seconds
            of the passes that capture the factors (the pool and validation forwards; with
            ``source="linear"`` also the backward to the chosen layers). The rest of the call is
            the feature arithmetic (Grams, projections).

    Returns:
        dict of the requested tensors (and an info dict when ``return_info``).
    """
    need = set(need)
    _check_request(need, source, val_batch, projection_dim)
    mods = _source_modules(model, source, modules, blocks)

    t0 = time.perf_counter()
    fs, stats = _factors(model, pool_batch, source, mods, "hidden" in need)
    out: dict[str, torch.Tensor] = {k: stats[k] for k in need & SCALAR_FEATURES}
    info: dict[str, Any] = {"source": source, "projection_dim": projection_dim, "gram": [], "modules": len(fs)}
    info["time_forward"] = time.perf_counter() - t0
    if not need & GRADIENT_FEATURES:
        return (out, info) if return_info else out
    t0 = time.perf_counter()
    wants_val = bool(need & {"val_scores", "val_gram"})
    gs = _factors(model, val_batch, source, mods, False)[0] if wants_val and val_batch is not None else None
    info["time_forward"] += time.perf_counter() - t0

    if projection_dim is not None or "grads" in need:
        info["backend"] = "projected" if projection_dim is not None else "materialized"
        out.update(_explicit_features(fs, gs, need, projection_dim=projection_dim, normalize=normalize, seed=seed))
    else:
        info["backend"] = "factors"
        out.update(_factor_features(fs, gs, need, normalize=normalize, method=method, infos=info["gram"]))
    log.info(
        "pool_gradient_features: source=%s (%d module(s)) backend=%s gram backends=%s need=%s",
        source,
        len(fs),
        info["backend"],
        [i["method"] for i in info["gram"]],
        sorted(need),
    )
    return (out, info) if return_info else out
