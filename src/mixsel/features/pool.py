"""The bridge the training step calls: every gradient feature of a pool from one pass over it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from mixsel import seeding
from mixsel.features.grads import (
    GRAM_METHODS,
    block_modules,
    capture_linear_factors,
    factor_gram,
    factor_grams,
    find_last_module,
    materialize_grads,
)
from mixsel.features.lm_head import DEFAULT_KEEP_ERR_BYTES, HeadTokens, head_grads, head_grams, head_pass, head_project
from mixsel.features.loss import GradFactors, forward_stats, output_embeddings
from mixsel.features.projection import KroneckerProjector
from mixsel.types import GRADIENT_FEATURES, SCALAR_FEATURES

__all__ = ["pool_gradient_features"]

log = logging.getLogger(__name__)

SOURCES = ("lm_head", "linear", "blocks")
HEAD_METHODS = ("auto", "blocked", "ghost", "materialize")
_GHOST_MAX_BYTES = 256 * 2**20  # the ghost backend holds err [N, V] of every target token


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

    return _vector_features(vectors(fs), vectors(gs) if gs is not None else None, need, normalize=normalize)


def _vector_features(
    feats: torch.Tensor, vfeats: torch.Tensor | None, need: set[str], *, normalize: bool
) -> dict[str, torch.Tensor]:
    """``grads``, Grams and norms from per-example feature vectors (pool ``feats``, anchors ``vfeats``)."""
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
    """Gram quantities straight from the factors (ghost or materialised inner products, no feature vectors).

    One sweep per module: its gradients are built once for every product asked for (``gram``,
    validation scores, validation Gram, norms), and the modules' products are summed.
    """
    wanted = {"gram"} if "gram" in need else set()
    if normalize or "grad_norm" in need:
        wanted.add("sq")
    if gs is not None and "val_scores" in need:
        wanted.add("cross")
    if gs is not None and ("val_gram" in need or normalize):
        wanted.add("val_gram")
    total: dict[str, torch.Tensor] = {}
    for i, f in enumerate(fs):
        parts, info = factor_grams(f, None if gs is None else gs[i], wanted, method=method)
        infos.append(info)
        for key, value in parts.items():
            total[key] = value if key not in total else total[key] + value
    memo = {("f", None): total.get("gram"), ("f", "g"): total.get("cross"), ("g", None): total.get("val_gram")}
    names = {id(fs): "f", id(gs): "g"}

    def kernel(a: Any, b: Any) -> torch.Tensor:
        k = memo[(names[id(a)], None if b is None else names[id(b)])]
        assert k is not None
        return k

    return _gram_features(kernel, lambda _a: total["sq"], fs, gs, need, normalize=normalize)


def _gram_features(
    kernel: Callable[[Any, Any], torch.Tensor],
    sq_norms: Callable[[Any], torch.Tensor],
    fs: Any,
    gs: Any,
    need: set[str],
    *,
    normalize: bool,
) -> dict[str, torch.Tensor]:
    """``gram`` / ``val_scores`` / ``val_gram`` / ``grad_norm`` from a Gram ``kernel(a, b | None)`` of two batches."""
    gram = kernel(fs, None) if "gram" in need else None
    if gram is not None:
        sq = gram.diagonal().clone()
    elif normalize or "grad_norm" in need:
        sq = sq_norms(fs)
    else:
        sq = None
    norms = None if sq is None else sq.clamp(min=0).sqrt()
    val_gram = kernel(gs, None) if gs is not None and ("val_gram" in need or normalize) else None
    vnorms = None if val_gram is None else val_gram.diagonal().clamp(min=0).sqrt()
    scale = None if norms is None else 1.0 / norms.clamp(min=1e-30)
    vscale = None if vnorms is None else 1.0 / vnorms.clamp(min=1e-30)

    def scaled(k: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
        return k * left[:, None] * right[None, :] if normalize else k  # type: ignore[index]

    out: dict[str, torch.Tensor] = {}
    if gram is not None:
        out["gram"] = scaled(gram, scale, scale)
    if "val_scores" in need and gs is not None:
        out["val_scores"] = scaled(kernel(fs, gs), scale, vscale)
    if "val_gram" in need and val_gram is not None:
        out["val_gram"] = scaled(val_gram, vscale, vscale)
    if "grad_norm" in need and norms is not None:
        out["grad_norm"] = norms
    return out


def _head_method(f: HeadTokens, g: HeadTokens | None, method: str) -> str:
    """``blocked`` (exact, by vocabulary blocks) unless ``ghost`` is asked for or predicted 2x cheaper."""
    if method != "auto":
        return method
    n_tok = float((f.scale > 0).sum())
    m_tok = float((g.scale > 0).sum()) if g is not None else 0.0
    v, h = f.vocab, f.hidden
    ghost = (n_tok * n_tok / 2 + n_tok * m_tok) * (v + h)
    blocked = (2 * (n_tok + m_tok) + f.n * (f.n / 2 + (g.n if g is not None else 0))) * v * h
    fits = (n_tok + m_tok) * v * f.h.element_size() <= _GHOST_MAX_BYTES
    return "ghost" if fits and 2 * ghost < blocked else "blocked"


def _lm_head_features(
    model: torch.nn.Module,
    pool_batch: dict[str, torch.Tensor],
    val_batch: dict[str, torch.Tensor] | None,
    need: set[str],
    *,
    projection_dim: int | None,
    normalize: bool,
    seed: int,
    method: str,
    info: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """LM-head features from :func:`head_pass` (chunked, inference mode, never the ``[n, T, V]`` logits)."""
    grad_need = need & GRADIENT_FEATURES
    head = output_embeddings(model)
    vocab, width = int(head.weight.shape[0]), int(head.weight.shape[1])
    proj = None
    if grad_need and projection_dim is not None:
        if projection_dim < vocab * width:
            proj = KroneckerProjector(vocab, width, projection_dim, seed=seeding.projection_seed(seed, 0))
        else:
            log.info("the LM head has %d <= %d gradient coordinates: kept exact", vocab * width, projection_dim)
    t0 = time.perf_counter()
    if grad_need == {"grad_norm"} and projection_dim is None:  # the norms alone come from the pass itself
        stats = head_pass(model, pool_batch, hidden="hidden" in need, sq_norms=True)
        out = {k: stats[k] for k in need & SCALAR_FEATURES}
        out["grad_norm"] = stats["grad_sq_norm"].clamp(min=0).sqrt()
        info["time_forward"] = time.perf_counter() - t0
        info["backend"] = "factors"
        info["gram"].append({"method": "in-pass"})
        return out
    keep = 0 if proj is not None or "grads" in need else DEFAULT_KEEP_ERR_BYTES  # the exact Grams reuse err
    stats = head_pass(
        model, pool_batch, hidden="hidden" in need, tokens=bool(grad_need), projector=proj, keep_err_bytes=keep
    )
    ft: HeadTokens | None = stats.pop("head_tokens", None)
    out: dict[str, torch.Tensor] = {k: stats[k] for k in need & SCALAR_FEATURES}
    wants_val = bool(need & {"val_scores", "val_gram"})
    gt = None
    if grad_need and wants_val and val_batch is not None:
        gt = head_pass(model, val_batch, tokens=True, projector=proj, keep_err_bytes=keep)["head_tokens"]
    info["time_forward"] = time.perf_counter() - t0
    if ft is None:
        return out
    if projection_dim is not None or "grads" in need:
        if proj is not None:

            def vectors(t: HeadTokens) -> torch.Tensor:
                return head_project(t, proj)

            info["backend"] = "projected"
        else:
            vectors = head_grads
            info["backend"] = "materialized"
        out.update(_vector_features(vectors(ft), vectors(gt) if gt is not None else None, need, normalize=normalize))
        return out
    info["backend"] = "factors"
    chosen = _head_method(ft, gt, method)
    if chosen == "blocked":
        info["gram"].append({"method": "blocked"})
        wanted = {"gram"} if "gram" in need else set()
        if normalize or "grad_norm" in need:
            wanted.add("sq")
        if gt is not None and "val_scores" in need:
            wanted.add("cross")
        if gt is not None and ("val_gram" in need or normalize):
            wanted.add("val_gram")
        grams = head_grams(ft, gt, wanted)
        memo = {("f", None): grams.get("gram"), ("f", "g"): grams.get("cross"), ("g", None): grams.get("val_gram")}
        names = {id(ft): "f", id(gt): "g"}

        def kernel(a: HeadTokens, b: HeadTokens | None) -> torch.Tensor:
            k = memo[(names[id(a)], None if b is None else names[id(b)])]
            assert k is not None
            return k

        out.update(_gram_features(kernel, lambda _a: grams["sq"], ft, gt, need, normalize=normalize))
    else:
        fs = [ft.to_factors()]
        gs = [gt.to_factors()] if gt is not None else None
        out.update(_factor_features(fs, gs, need, normalize=normalize, method=chosen, infos=info["gram"]))
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
        method: exact Gram backend, ``"auto"`` | ``"ghost"`` | ``"materialize"`` (| ``"blocked"`` for the LM
            head). With ``source="lm_head"``, ``"auto"`` runs :func:`~mixsel.features.lm_head.head_pass`
            (chunked, inference mode) and the exact Gram by vocabulary blocks (``"blocked"``; ``"ghost"``
            when predicted 2x cheaper, i.e. short sequences); ``"ghost"`` / ``"materialize"`` force the
            full-logits path with the factors of :mod:`mixsel.features.grads`.
        return_info: also return an info dict: which backends ran, and ``time_forward``, the seconds
            of the passes that capture the factors (the pool and validation forwards; with
            ``source="linear"`` also the backward to the chosen layers). The rest of the call is
            the feature arithmetic (Grams, projections).

    Returns:
        dict of the requested tensors (and an info dict when ``return_info``).
    """
    need = set(need)
    _check_request(need, source, val_batch, projection_dim)
    if method not in HEAD_METHODS or (method == "blocked" and source != "lm_head"):
        raise ValueError(f"method={method!r} is not one of {GRAM_METHODS} (or 'blocked' with source='lm_head')")
    info: dict[str, Any] = {"source": source, "projection_dim": projection_dim, "gram": []}
    if source == "lm_head" and method in ("auto", "blocked"):
        out = _lm_head_features(
            model,
            pool_batch,
            val_batch,
            need,
            projection_dim=projection_dim,
            normalize=normalize,
            seed=seed,
            method=method,
            info=info,
        )
        _log_backend(info, need)
        return (out, info) if return_info else out
    mods = _source_modules(model, source, modules, blocks)

    t0 = time.perf_counter()
    fs, stats = _factors(model, pool_batch, source, mods, "hidden" in need)
    out: dict[str, torch.Tensor] = {k: stats[k] for k in need & SCALAR_FEATURES}
    info["modules"] = len(fs)
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
    _log_backend(info, need)
    return (out, info) if return_info else out


def _log_backend(info: dict[str, Any], need: set[str]) -> None:
    log.info(
        "pool_gradient_features: source=%s (%d module(s)) backend=%s gram backends=%s need=%s",
        info["source"],
        info.get("modules", 1),
        info.get("backend", "none"),
        [i["method"] for i in info["gram"]],
        sorted(need),
    )
