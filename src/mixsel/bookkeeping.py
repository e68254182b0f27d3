"""Step bookkeeping shared by every training loop: ``mixsel train`` and the Hugging Face / TRL trainers.

One piece of code per idea, so a method behaves the same in every loop:

* :func:`mixture_weights`: where a reweighter's weights act this step (the pool's sampling mixture,
  per-domain loss multipliers ``D * alpha_d``);
* :func:`draw_anchors`: the validation anchors of a step (the selection target of PartitionSel,
  GREATS, per_domain), uniform or balanced over domains, identical on every rank;
* :func:`source_sizes`: the dataset's training examples per domain (CoLM's small sources);
* :func:`resolve_use_weights`: whether the loss applies the selection weights (one switch, the
  method's reference by default, a warning when the choice departs from it), and
  :func:`example_weights`: the per-example loss weights of the selected batch (selection weights,
  when used, times the domain loss multipliers);
* :func:`domain_stats`, :func:`reference_losses`, :func:`domain_gradients`, :func:`reduce_stats`:
  the per-domain :class:`mixsel.DomainStats` a reweighter consumes (losses, DoReMi's per-token
  excess over a reference model, DoGraph's domain gradients), summed over ranks;
* :func:`is_update_step`, :func:`balanced_rows`: on which steps, and from which validation rows,
  a reweighter's validation gradient is computed;
* :func:`gradient_capture`, :func:`captured_domain_gradients`, :func:`validation_gradient`:
  DoGraph's domain gradients of the trained rows, captured in the training step's own backward
  (``reweighting.grad_rows=trained``), and its validation target;
* :func:`is_stats_step`: on which steps the costly statistics are computed (``reweighting.amortize``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.reweighting.base import Reweighter
from mixsel.seeding import anchor_seed
from mixsel.types import DomainStats, Selection

__all__ = [
    "ANCHOR_SAMPLING",
    "MODEL_KEYS",
    "balanced_rows",
    "captured_domain_gradients",
    "domain_gradients",
    "domain_stats",
    "draw_anchors",
    "example_weights",
    "gradient_capture",
    "is_stats_step",
    "is_update_step",
    "mixture_weights",
    "reduce_stats",
    "reference_losses",
    "resolve_use_weights",
    "source_sizes",
    "validation_gradient",
]

#: How :func:`draw_anchors` draws the validation anchors.
ANCHOR_SAMPLING = ("uniform", "balanced")

log = logging.getLogger(__name__)

#: The batch columns a forward pass reads.
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def mixture_weights(reweighter: Reweighter) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where the reweighter's current weights act this step.

    Returns:
        ``(sampling, loss)``: the domain mixture the candidate pool is drawn from (the weights in
        ``sampling``/``both`` mode, else the reweighter's :attr:`proposal_weights`; ``None`` = the
        natural mixture), and the per-domain loss multipliers ``D * alpha_d`` in ``loss``/``both``
        mode (``None`` = every domain weighs 1; uniform weights give exactly 1).
    """
    weights = reweighter.weights
    sampling = weights if reweighter.mode in ("sampling", "both") else reweighter.proposal_weights
    loss = weights * len(reweighter.domains) if reweighter.mode in ("loss", "both") else None
    return sampling, loss


def draw_anchors(
    val_domains: torch.Tensor | int, n: int, *, seed: int, step: int, sampling: str = "uniform"
) -> torch.Tensor:
    """``n`` validation rows for the step's selection target, the same on every rank.

    Args:
        val_domains: LongTensor[m] domain id of every validation example, or just their number m
            (enough for ``"uniform"``).
        n: anchors per step (``selection.features.val_anchors``; PartitionSel's code draws 4).
        seed: the run's seed.
        step: the training step (or micro-step) id.
        sampling: ``"uniform"``: uniformly without replacement over all validation examples (the
            reference code); ``"balanced"``: round-robin over the domains present, in a seeded
            per-step order (each domain gets floor(n / D) or one more; rows uniform within a domain).

    Returns:
        LongTensor[min(n, m)] row indices.
    """
    if sampling not in ANCHOR_SAMPLING:
        raise ConfigError(f"anchor sampling {sampling!r} is not one of {', '.join(ANCHOR_SAMPLING)}")
    num_val = val_domains if isinstance(val_domains, int) else int(torch.as_tensor(val_domains).numel())
    g = torch.Generator().manual_seed(anchor_seed(seed, step))
    if sampling == "uniform":
        return torch.randperm(num_val, generator=g)[:n]
    if isinstance(val_domains, int):
        raise ConfigError("balanced anchors need the domain id of every validation example, not just their number")
    domains = torch.as_tensor(val_domains, dtype=torch.long).reshape(-1)
    present = torch.unique(domains)
    order = present[torch.randperm(present.numel(), generator=g)].tolist()
    members = {d: torch.nonzero(domains == d).flatten() for d in order}
    members = {d: rows[torch.randperm(rows.numel(), generator=g)] for d, rows in members.items()}
    picks: list[int] = []
    depth = 0
    while len(picks) < min(n, num_val):
        for d in order:
            if depth < members[d].numel() and len(picks) < n:
                picks.append(int(members[d][depth]))
        depth += 1
    return torch.tensor(picks, dtype=torch.long)


def source_sizes(domain_ids: torch.Tensor | Sequence[int], num_domains: int) -> torch.Tensor:
    """LongTensor[num_domains]: training examples of each domain in the whole dataset (``Pool.source_sizes``)."""
    return torch.bincount(torch.as_tensor(domain_ids, dtype=torch.long).reshape(-1), minlength=num_domains)


def resolve_use_weights(selector: Any, use_weights: bool | None) -> bool:
    """Whether the loss applies the selection weights (``selection.use_weights``).

    Selectors always return their natural weights (OMP coefficients, medoid cluster sizes, ones);
    this one switch decides whether the loss uses them. ``None`` takes the method's reference
    (the selector's ``weighted_loss``: true for CRAIG and GradMatch, false otherwise). An explicit
    choice against the reference is allowed, with a warning.
    """
    name = getattr(selector, "name", type(selector).__name__)
    declared = getattr(selector, "weighted_loss", None)
    if use_weights is None:
        return bool(declared)
    if declared is True and not use_weights:
        log.warning(
            "selection.use_weights=false: %r trains on its selection weights in the paper and the reference "
            "code; the loss now ignores them (an unweighted coreset, a deviation)",
            name,
        )
    elif declared is False and use_weights:
        log.warning(
            "selection.use_weights=true: %r trains unweighted in the paper and the reference code; the loss "
            "now applies its selection weights (OMP coefficients or cluster sizes, a deviation)",
            name,
        )
    return bool(use_weights)


def example_weights(
    selection: Selection, domains: torch.Tensor, *, use_weights: bool, loss_weights: torch.Tensor | None
) -> torch.Tensor:
    """Float32 loss weight of each selected example.

    ``w_i = s_i * m_{d_i}``: ``s_i`` the selection weight when ``use_weights`` (else 1), ``m_d`` the
    reweighter's loss multiplier of the example's domain (see :func:`mixture_weights`; else 1). The
    loops normalise by the (global) sum of ``w``.

    Args:
        selection: the selected rows with their weights.
        domains: LongTensor[k] domain id of each selected row.
        use_weights: apply the selection weights (:func:`resolve_use_weights`).
        loss_weights: Tensor[D] per-domain multipliers or None.
    """
    w = selection.weights.to(torch.float32) if use_weights else torch.ones(len(selection))
    if loss_weights is not None:
        w = w * loss_weights.to(torch.float32)[domains]
    return w


def domain_stats(
    domains: torch.Tensor,
    losses: torch.Tensor,
    num_domains: int,
    *,
    step: int,
    ref_losses: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> DomainStats:
    """Per-domain counts and summed losses of the trained rows (float64).

    With per-token losses (``losses`` [k, T] and the target ``mask`` [k, T], e.g. from
    :func:`mixsel.features.loss.token_losses` and ``target_mask(labels)``) the stats also hold the
    domains' target-token counts and, with per-token reference losses, the sum of the per-token
    clipped excess ``max(l_t - l_ref_t, 0)`` that DoReMi averages over each domain's tokens
    (arXiv 2305.10429, Alg. 1 line 7).

    Args:
        domains: LongTensor[k] domain id of each trained row.
        losses: Tensor[k] per-example training loss, or Tensor[k, T] per-token losses.
        num_domains: number of domains.
        step: the training step.
        ref_losses: optional per-example (or per-token, same shape as ``losses``) losses of a
            reference model (DoReMi).
        mask: BoolTensor[k, T] target tokens; required with per-token losses.
    """

    def summed(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_domains, dtype=torch.float64).index_add_(0, domains, values.detach().double().cpu())

    domains = domains.cpu()
    token_counts = excess_sum = None
    if mask is not None:
        mask = mask.detach().cpu().bool()
        if losses.numel() == 0:
            losses = torch.zeros(mask.shape, dtype=torch.float64)
        if losses.shape != mask.shape:
            raise ValueError(f"per-token losses {tuple(losses.shape)} and mask {tuple(mask.shape)} must match")
        tokens = mask.double()
        per_token = losses.detach().double().cpu() * tokens
        token_counts = summed(tokens.sum(1))
        losses = per_token.sum(1) / tokens.sum(1).clamp_min(1)
        if ref_losses is not None:
            ref_tok = ref_losses.detach().double().cpu() * tokens
            if ref_tok.shape != per_token.shape:
                raise ValueError(f"reference losses {tuple(ref_tok.shape)} must be per token like {tuple(mask.shape)}")
            excess_sum = summed(((per_token - ref_tok).clamp_min(0) * tokens).sum(1))
            ref_losses = ref_tok.sum(1) / tokens.sum(1).clamp_min(1)
    elif losses.dim() != 1:
        raise ValueError("per-token losses [k, T] need mask=<the target tokens [k, T]>")
    return DomainStats(
        counts=torch.bincount(domains, minlength=num_domains).to(torch.float64),
        loss_sum=summed(losses),
        ref_loss_sum=None if ref_losses is None else summed(ref_losses),
        step=step,
        token_counts=token_counts,
        excess_sum=excess_sum,
    )


def reference_losses(
    reference: torch.nn.Module, batch: dict[str, torch.Tensor], micro_batch_size: int | None = None
) -> torch.Tensor:
    """Per-token losses of a frozen reference model on ``batch`` (CPU float64, 0 off target tokens).

    Feed them to :func:`domain_stats` with the proxy's per-token losses and the target mask.

    One inference-mode pass (:func:`mixsel.features.lm_head.head_pass`: the head applied at the
    target tokens only, never the full logits), in chunks of ``micro_batch_size`` rows.

    Args:
        reference: the reference LM (eval mode, no gradients).
        batch: ``input_ids``, ``attention_mask``, ``labels`` of the rows, on any device.
        micro_batch_size: rows per forward (None = all at once).

    Returns:
        Tensor[k, T - 1] (:func:`mixsel.features.loss.token_losses`).
    """
    from mixsel.features.lm_head import head_pass

    device = next(reference.parameters()).device
    n = int(batch["input_ids"].shape[0])
    step = micro_batch_size or max(n, 1)
    out = []
    for s in range(0, n, step):
        rows = {k: batch[k][s : s + step].to(device) for k in MODEL_KEYS if k in batch}
        out.append(head_pass(reference, rows, token_losses=True)["token_losses"].double().cpu())
    width = max(int(batch["labels"].shape[1]) - 1, 0)
    return torch.cat(out) if out else torch.zeros(0, width, dtype=torch.float64)


def domain_gradients(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    domains: torch.Tensor,
    num_domains: int,
    *,
    val_batch: dict[str, torch.Tensor] | None,
    source: str,
    modules: Sequence[str] | None,
    projection_dim: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed per-domain gradient features of ``batch`` and the mean validation gradient (DoGraph).

    Projected per-example gradients (``selection.features.source`` / ``modules``, Kronecker-projected to
    ``projection_dim``, the same seed on every rank) are summed per domain; the caller all-reduces
    the sums (:func:`reduce_stats`), so the reweighter sees domain means over the whole world.

    Args:
        model: the model being trained (set to eval mode for the pass, then restored).
        batch: the rows (``input_ids``, ``attention_mask``, ``labels``), e.g. this rank's share of the pool.
        domains: LongTensor[n] their domain ids.
        num_domains: number of domains.
        val_batch: validation rows for the target gradient, or None when no update follows this step.
        source, modules: where the gradient features come from.
        projection_dim: dimension of the projected features (``reweighting.projection_dim``).
        seed: projection seed.

    Returns:
        ``(grad_sum, val_grad)``: Tensor[D, d] float64 (CPU) and Tensor[d] float64 (CPU) or None.
    """
    grads = _row_features(model, batch, source=source, modules=modules, projection_dim=projection_dim, seed=seed)
    summed = torch.zeros(num_domains, grads.shape[1], dtype=torch.float64)
    summed.index_add_(0, domains.cpu(), grads.double())
    val_grad = None
    if val_batch is not None:
        val_grad = validation_gradient(
            model, val_batch, source=source, modules=modules, projection_dim=projection_dim, seed=seed
        )
    return summed, val_grad


def _grad_kwargs(source: str, modules: Sequence[str] | None, projection_dim: int, seed: int) -> dict[str, Any]:
    return {
        "source": _grad_source(source),
        "modules": modules,
        "projection_dim": projection_dim,
        "seed": seed,
        "need": ("grads",),
    }


def _grad_source(source: str) -> str:
    """DoGraph's features: the LM head unless a source is asked for (``selection.features.source=auto``)."""
    return "lm_head" if source == "auto" else source


def validation_gradient(
    model: torch.nn.Module,
    val_batch: dict[str, torch.Tensor],
    *,
    source: str,
    modules: Sequence[str] | None,
    projection_dim: int,
    seed: int,
) -> torch.Tensor:
    """Tensor[d] float64 (CPU): the mean projected gradient of ``val_batch`` (DoGraph's target)."""
    return (
        _row_features(model, val_batch, source=source, modules=modules, projection_dim=projection_dim, seed=seed)
        .double()
        .mean(0)
    )


def gradient_capture(
    model: torch.nn.Module, *, source: str, modules: Sequence[str] | None, projection_dim: int, seed: int
) -> Any:
    """A :class:`mixsel.features.capture.GradientCapture` of the features :func:`domain_gradients` computes.

    Wrap the training micro-batches in it and ``watch`` each micro-batch's per-example losses; then
    :func:`captured_domain_gradients` gives the domain sums of the trained rows without a second pass.
    """
    from mixsel.features.capture import GradientCapture
    from mixsel.features.loss import output_embeddings
    from mixsel.features.pool import _source_modules

    source = _grad_source(source)
    if source == "lm_head":
        return GradientCapture(model, [output_embeddings(model)], projection_dim=projection_dim, seed=seed, bias=False)
    mods = _source_modules(model, source, modules, 3)  # pool_gradient_features' default blocks
    return GradientCapture(model, mods, projection_dim=projection_dim, seed=seed)


def captured_domain_gradients(
    capture: Any,
    batch: dict[str, torch.Tensor],
    domains: torch.Tensor,
    num_domains: int,
    *,
    model: torch.nn.Module,
    source: str,
    modules: Sequence[str] | None,
    projection_dim: int,
    seed: int,
) -> torch.Tensor:
    """Tensor[D, d] float64 (CPU): summed per-domain gradient features of the captured (trained) rows.

    Rows that had zero weight in the loss (so no gradient in the step) are computed by a separate pass.

    Args:
        capture: the :func:`gradient_capture` that watched the step's micro-batches.
        batch: the trained rows (``input_ids``, ``attention_mask``, ``labels``), in micro-batch order.
        domains: LongTensor[k] their domain ids.
    """
    feats, missing = capture.features()
    if bool(missing.any()):
        rows = torch.nonzero(missing).flatten()
        sub = {k: batch[k][rows] for k in MODEL_KEYS}
        feats[rows] = _row_features(
            model, sub, source=source, modules=modules, projection_dim=projection_dim, seed=seed
        ).to(feats.dtype)
    summed = torch.zeros(num_domains, feats.shape[1], dtype=torch.float64)
    return summed.index_add_(0, domains.cpu(), feats.double())


def _row_features(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    source: str,
    modules: Sequence[str] | None,
    projection_dim: int,
    seed: int,
) -> torch.Tensor:
    from mixsel.features import pool_gradient_features

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        on_device = {k: batch[k].to(device) for k in MODEL_KEYS}
        return pool_gradient_features(model, on_device, **_grad_kwargs(source, modules, projection_dim, seed))[
            "grads"
        ].cpu()
    finally:
        model.train(was_training)


def is_stats_step(step: int, update_every: int, amortize: bool) -> bool:
    """Whether the costly domain statistics are computed at ``step``: every step, or with ``amortize``
    only on the last step of each ``update_every`` window (the loop then updates the reweighter on
    those steps alone, with that step's statistics)."""
    return not amortize or (step + 1) % update_every == 0


def balanced_rows(domain_ids: torch.Tensor, num_domains: int, per_domain: int) -> torch.Tensor:
    """The first ``per_domain`` rows of every domain (in domain order): DoGraph's validation target."""
    return torch.cat([torch.nonzero(domain_ids == d).reshape(-1)[:per_domain] for d in range(num_domains)])


def is_update_step(step: int, update_every: int) -> bool:
    """Whether a validation gradient is computed at ``step``: the first step and every step after
    which a reweighter with ``update_every`` applies its rule (its window keeps the latest one)."""
    return step == 0 or (step + 1) % update_every == 0


def reduce_stats(stats: DomainStats, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> DomainStats:
    """Sum the additive fields of ``stats`` over ranks with ``all_reduce`` (``val_grad`` is the same everywhere)."""
    for name in ("counts", "loss_sum", "ref_loss_sum", "grad", "token_counts", "excess_sum"):
        value = getattr(stats, name)
        if value is not None:
            setattr(stats, name, all_reduce(value))
    return stats
