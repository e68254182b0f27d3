"""Exact per-example gradients of the LM head or of chosen linear layers, and their inner products.

For a linear map ``y_t = W x_t`` the gradient of example ``i``'s loss w.r.t. ``W`` is a sum of rank-one
terms ``G_i = sum_t a_it b_it^T`` (``a`` = gradient w.r.t. the output, ``b`` = the input). Inner products
between two such gradients need not materialise them (the "ghost" identity used by GREATS and
PartitionSel's memory-efficient gradient computation):

    <G_i, G'_j> = sum_{t, s} (a_it . a'_js) (b_it . b'_js).

Two backends compute a Gram matrix ``K[i, j] = <G_i, G'_j>``:

* ``"ghost"``: the identity above over the target tokens only, chunked over token blocks; cost about
  ``N * M * (P + Q)`` for ``N``/``M`` contributing tokens in the two batches and a ``P x Q`` weight;
* ``"materialize"``: build the ``[n, P*Q]`` gradients (one batched matmul per example chunk) and take
  ``G G'^T``; cost about ``(N + M) * P * Q + n * m * P * Q`` and ``(n + m) * P * Q`` numbers of memory.

``method="auto"`` picks the cheaper by these counts (and avoids materialising above ``max_bytes``), logs
the choice at INFO level and reports it in the returned info (``return_info=True``).

The factors of the LM head come from one no-grad forward (:func:`mixsel.features.loss.forward_stats`);
those of any ``nn.Linear`` (or a peft ``lora_A`` / ``lora_B`` Linear) from forward hooks capturing its
inputs plus one ``torch.autograd.grad`` of the summed per-example losses w.r.t. the captured outputs
(examples are independent, so each example's output gradients are its own).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mixsel.features.loss import (
    GradFactors,
    forward_stats,
    model_inputs,
    output_embeddings,
    per_example_loss,
    stats_from_logits,
)

__all__ = [
    "GRAM_METHODS",
    "block_modules",
    "capture_linear_factors",
    "decoder_layers",
    "factor_gram",
    "factor_grams",
    "factor_sq_norms",
    "find_last_module",
    "ghost_gram",
    "last_layer_grads",
    "last_layer_gram",
    "linear_grads",
    "linear_gram",
    "materialize_grads",
    "resolve_modules",
]

log = logging.getLogger(__name__)

GRAM_METHODS = ("auto", "ghost", "materialize")
DEFAULT_CHUNK = 2048  # tokens per ghost block / rows per materialised chunk bound
DEFAULT_MAX_BYTES = 2 * 2**30  # auto never materialises more than this
DEFAULT_GRAPH_BYTES = 192 * 2**20  # autograd graph of one row chunk in capture_linear_factors (rough bound)


# --------------------------------------------------------------------------------------------------
# Kernels on factors
# --------------------------------------------------------------------------------------------------


def _flat_tokens(f: GradFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contributing tokens only: a [N, P], b [N, Q(+1)], example index [N]."""
    idx = f.mask.nonzero()
    seg = idx[:, 0]
    a = f.out_grads[idx[:, 0], idx[:, 1]]
    b = f.inputs_with_bias()[idx[:, 0], idx[:, 1]]
    return a, b, seg


def ghost_gram(f: GradFactors, g: GradFactors | None = None, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``K[i, j] = sum_{t,s} (a_it . a'_js)(b_it . b'_js)`` without materialising any gradient.

    Args:
        f: factors of the first batch (n examples).
        g: factors of the second batch (m examples), or None for the symmetric self-Gram.
        chunk: tokens per block; memory is O(chunk^2) besides the factors.

    Returns:
        Tensor[n, m] (or [n, n]).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    a1, b1, s1 = _flat_tokens(f)
    n = f.n
    if g is None:
        k_diag = a1.new_zeros(n, n)
        k_up = a1.new_zeros(n, n)
        for r0 in range(0, a1.shape[0], chunk):
            ra, rb, rs = a1[r0 : r0 + chunk], b1[r0 : r0 + chunk], s1[r0 : r0 + chunk]
            for c0 in range(r0, a1.shape[0], chunk):
                m = (ra @ a1[c0 : c0 + chunk].T) * (rb @ b1[c0 : c0 + chunk].T)
                rows = a1.new_zeros(n, m.shape[1]).index_add_(0, rs, m)
                target = k_diag if c0 == r0 else k_up
                target.index_add_(1, s1[c0 : c0 + chunk], rows)
        return k_diag + k_up + k_up.T
    if g.shape != f.shape or g.bias != f.bias:
        raise ValueError(f"factor shapes differ: {f.shape} (bias={f.bias}) vs {g.shape} (bias={g.bias})")
    a2, b2, s2 = _flat_tokens(g.to(f.out_grads.dtype))
    k = a1.new_zeros(n, g.n)
    for r0 in range(0, a1.shape[0], chunk):
        ra, rb, rs = a1[r0 : r0 + chunk], b1[r0 : r0 + chunk], s1[r0 : r0 + chunk]
        for c0 in range(0, a2.shape[0], chunk):
            m = (ra @ a2[c0 : c0 + chunk].T) * (rb @ b2[c0 : c0 + chunk].T)
            rows = a1.new_zeros(n, m.shape[1]).index_add_(0, rs, m)
            k.index_add_(1, s2[c0 : c0 + chunk], rows)
    return k


def _example_chunk(f: GradFactors, max_bytes: int) -> int:
    per_example = f.dim * f.out_grads.element_size()
    return max(1, int(max_bytes // max(per_example, 1)))


def materialize_grads(f: GradFactors, *, chunk: int | None = None) -> torch.Tensor:
    """Per-example gradients ``G_i = sum_t a_it b_it^T`` flattened to Tensor[n, P*Q (+P)].

    The weight part is flattened row-major (as ``weight.flatten()``), followed by the bias part.

    Args:
        f: the factors.
        chunk: examples per batched matmul (default: as many as fit in 256 MiB of intermediates).
    """
    chunk = chunk or _example_chunk(f, 256 * 2**20)
    p, q = f.shape
    out = f.out_grads.new_empty(f.n, f.dim)
    inputs = f.inputs_with_bias()
    for i0 in range(0, f.n, chunk):
        g = f.out_grads[i0 : i0 + chunk].transpose(1, 2) @ inputs[i0 : i0 + chunk]  # [c, P, Q(+1)]
        out[i0 : i0 + chunk, : p * q] = g[:, :, :q].reshape(g.shape[0], -1)
        if f.bias:
            out[i0 : i0 + chunk, p * q :] = g[:, :, q]
    return out


def factor_sq_norms(f: GradFactors, *, chunk: int = 16) -> torch.Tensor:
    """Tensor[n]: squared norms ``||G_i||^2`` (the diagonal of the self-Gram), without the n x n Gram.

    Batched over ``chunk`` examples; the cheaper of the ghost form ``sum((A A^T) * (B B^T))`` (cost
    ``T^2 (P + Q)`` per example) and the materialised ``||A^T B||^2`` (cost ``T P Q``) is used. Positions
    outside the mask hold zeros in both factors, so they add nothing.
    """
    p, q = f.shape
    inputs = f.inputs_with_bias()
    t = f.mask.shape[1]
    ghost = t * (p + q + 1) <= p * inputs.shape[-1]
    out = f.out_grads.new_zeros(f.n)
    for i0 in range(0, f.n, chunk):
        a, b = f.out_grads[i0 : i0 + chunk], inputs[i0 : i0 + chunk]
        if ghost:
            out[i0 : i0 + chunk] = ((a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))).sum((1, 2))
        else:
            out[i0 : i0 + chunk] = (a.transpose(1, 2) @ b).square().sum((1, 2))
    return out


def _gram_costs(f: GradFactors, g: GradFactors | None) -> dict[str, float]:
    p, q = f.shape
    q = q + int(f.bias)
    n_tok = float(f.mask.sum())
    if g is None:
        m_tok, m = n_tok, f.n
        ghost = n_tok * n_tok * (p + q) / 2
        mat = n_tok * p * q + f.n * f.n * p * q / 2
        mat_bytes = f.n * p * q * f.out_grads.element_size()
    else:
        m_tok, m = float(g.mask.sum()), g.n
        ghost = n_tok * m_tok * (p + q)
        mat = (n_tok + m_tok) * p * q + f.n * m * p * q
        mat_bytes = (f.n + m) * p * q * f.out_grads.element_size()
    return {
        "ghost_flops": 2 * ghost,
        "materialize_flops": 2 * mat,
        "materialize_bytes": float(mat_bytes),
        "tokens": n_tok,
        "other_tokens": m_tok,
    }


def factor_gram(
    f: GradFactors,
    g: GradFactors | None = None,
    *,
    method: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gram matrix of the gradients given by factors, with the backend chosen by cost.

    Args:
        f: factors of the first batch.
        g: factors of the second batch, or None for the self-Gram.
        method: ``"auto"`` (cheaper by the cost model), ``"ghost"`` or ``"materialize"``.
        chunk: tokens per ghost block.
        max_bytes: ``"auto"`` does not materialise gradients taking more memory than this.

    Returns:
        (Tensor[n, m], info) where info holds ``method`` (the backend used) and the cost estimates.
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"method={method!r} is not one of {GRAM_METHODS}")
    info: dict[str, Any] = _gram_costs(f, g)
    if method == "auto":
        cheaper = "ghost" if info["ghost_flops"] <= info["materialize_flops"] else "materialize"
        if cheaper == "materialize" and info["materialize_bytes"] > max_bytes:
            cheaper = "ghost"
        method = cheaper
    info["method"] = method
    if method == "ghost":
        k = ghost_gram(f, g, chunk=chunk)
    else:
        gf = materialize_grads(f)
        k = gf @ gf.T if g is None else gf @ materialize_grads(g.to(gf.dtype)).T
    return k, info


def factor_grams(
    f: GradFactors,
    g: GradFactors | None,
    wanted: set[str],
    *,
    method: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every Gram product of one module in one go: ``gram`` (f, f), ``cross`` (f, g), ``val_gram`` (g, g), ``sq``.

    With the materialising backend each batch's gradients are built once and feed every product
    (instead of once per product); the ghost backend runs once per product. ``method`` as
    :func:`factor_gram` (``"auto"`` decides from the self-Gram's costs).
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"method={method!r} is not one of {GRAM_METHODS}")
    info: dict[str, Any] = _gram_costs(f, None)
    if method == "auto":
        cheaper = "ghost" if info["ghost_flops"] <= info["materialize_flops"] else "materialize"
        if cheaper == "materialize" and info["materialize_bytes"] > max_bytes:
            cheaper = "ghost"
        method = cheaper
    info["method"] = method
    out: dict[str, torch.Tensor] = {}
    if method == "materialize":
        gf = materialize_grads(f) if wanted & {"gram", "cross", "sq"} else None
        gg = materialize_grads(g.to(f.out_grads.dtype)) if g is not None and wanted & {"cross", "val_gram"} else None
        if gf is not None and "gram" in wanted:
            out["gram"] = gf @ gf.T
        if gf is not None and "sq" in wanted:
            out["sq"] = out["gram"].diagonal().clone() if "gram" in out else gf.square().sum(1)
        if gf is not None and gg is not None and "cross" in wanted:
            out["cross"] = gf @ gg.T
        if gg is not None and "val_gram" in wanted:
            out["val_gram"] = gg @ gg.T
        return out, info
    if "gram" in wanted:
        out["gram"] = ghost_gram(f, chunk=chunk)
    if "sq" in wanted:
        out["sq"] = out["gram"].diagonal().clone() if "gram" in out else factor_sq_norms(f)
    if g is not None and "cross" in wanted:
        out["cross"] = ghost_gram(f, g, chunk=chunk)
    if g is not None and "val_gram" in wanted:
        out["val_gram"] = ghost_gram(g, chunk=chunk)
    return out, info


# --------------------------------------------------------------------------------------------------
# LM head
# --------------------------------------------------------------------------------------------------


def _lm_factors(model: torch.nn.Module, batch: dict[str, torch.Tensor] | None) -> GradFactors:
    if batch is None:
        raise ValueError("pass a batch (dict(input_ids, attention_mask, labels)) or precomputed factors")
    return forward_stats(model, batch, factors=True)["lm_head"]


def last_layer_grads(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor] | None,
    *,
    factors: GradFactors | None = None,
) -> torch.Tensor:
    """Exact per-example gradients of the per-example mean-token loss w.r.t. the LM head weight.

    ``grad_i = sum_t (softmax(z_it) - onehot(y_it)) h_it^T / c_i`` from one no-grad forward (no backward).
    With tied embeddings this is the gradient w.r.t. the head's *use* of the shared matrix.

    Args:
        model: a Hugging Face causal LM.
        batch: dict(input_ids, attention_mask, labels), -100 = ignored.
        factors: precomputed ``forward_stats(..., factors=True)["lm_head"]`` (then ``batch`` is unused).

    Returns:
        Tensor[n, V*H], each row ``grad_i.flatten()`` (row-major like ``lm_head.weight``).
    """
    f = factors if factors is not None else _lm_factors(model, batch)
    return materialize_grads(f)


def last_layer_gram(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor] | None,
    other: dict[str, torch.Tensor] | None = None,
    *,
    method: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    max_bytes: int = DEFAULT_MAX_BYTES,
    return_info: bool = False,
    factors: GradFactors | None = None,
    other_factors: GradFactors | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Inner products of the LM-head per-example gradients (ghost identity or materialised).

    Args:
        model: a Hugging Face causal LM.
        batch: the pool, dict(input_ids, attention_mask, labels).
        other: a second batch (e.g. validation anchors) for the cross Gram [n, m]; None = self Gram.
        method: ``"auto"``, ``"ghost"`` or ``"materialize"`` (see module docstring).
        chunk: tokens per ghost block.
        max_bytes: memory cap for ``"auto"`` materialisation.
        return_info: also return a dict saying which backend ran and its cost estimates.
        factors, other_factors: precomputed LM-head factors (skip the forwards).

    Returns:
        Tensor[n, n] or Tensor[n, m] (and the info dict when ``return_info``).
    """
    f = factors if factors is not None else _lm_factors(model, batch)
    g = None
    if other is not None or other_factors is not None:
        g = other_factors if other_factors is not None else _lm_factors(model, other)
    k, info = factor_gram(f, g, method=method, chunk=chunk, max_bytes=max_bytes)
    log.info(
        "last_layer_gram: %s backend for %s Gram (n=%d, m=%d, tokens=%d/%d; est. ghost %.2e vs materialize %.2e flops)",
        info["method"],
        "self" if g is None else "cross",
        f.n,
        f.n if g is None else g.n,
        info["tokens"],
        info["other_tokens"],
        info["ghost_flops"],
        info["materialize_flops"],
    )
    return (k, info) if return_info else k


# --------------------------------------------------------------------------------------------------
# Any linear layer (incl. peft LoRA A/B)
# --------------------------------------------------------------------------------------------------


def find_last_module(model: torch.nn.Module, suffix: str = "v_proj", *, lora: str = "auto") -> str:
    """Name of the last module whose name ends with ``suffix`` (e.g. the last V-projection).

    Args:
        model: any module (a peft model is fine).
        suffix: last component(s) of the module name, e.g. ``"v_proj"`` or ``"self_attn.v_proj"``.
        lora: for a peft LoRA layer: ``"auto"`` or ``"B"`` -> its ``lora_B`` Linear of the active
            adapter (CoLM's choice), ``"A"`` -> ``lora_A``, ``"base"`` -> the frozen base Linear.
            For a plain layer ``"auto"`` and ``"base"`` return the layer itself.

    Returns:
        The module name, usable with ``model.get_submodule`` and :func:`linear_grads`.
    """
    if lora not in ("auto", "A", "B", "base"):
        raise ValueError(f"lora={lora!r} must be one of 'auto', 'A', 'B', 'base'")
    found = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not found:
        raise ValueError(f"no module name ends with {suffix!r} in {type(model).__name__}")
    name, module = found[-1]
    lora_b = getattr(module, "lora_B", None)
    if isinstance(lora_b, torch.nn.ModuleDict) and len(lora_b) > 0:
        if lora == "base":
            return f"{name}.base_layer"
        active = getattr(module, "active_adapters", None) or list(lora_b.keys())
        adapter = active[0] if isinstance(active, (list, tuple)) else active
        return f"{name}.lora_{'A' if lora == 'A' else 'B'}.{adapter}"
    if lora in ("A", "B"):
        raise ValueError(f"{name} is not a peft LoRA layer; use lora='auto' or wrap the model with peft")
    return name


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """``(name, layers)``: the model's stack of transformer blocks.

    The ``nn.ModuleList`` holding the most parameters (``model.layers`` of a Llama, also under a
    peft wrapper).

    Raises:
        ValueError: the model has no ``nn.ModuleList`` of blocks.
    """
    best: tuple[str, torch.nn.ModuleList, int] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; use "
            "selection.features.source=lm_head or source=linear with explicit modules"
        )
    return best[0], best[1]


def _lora_adapter(module: torch.nn.Module) -> str | None:
    """The active adapter name of a peft LoRA layer, or None for any other module."""
    lora_a = getattr(module, "lora_A", None)
    if not isinstance(lora_a, torch.nn.ModuleDict) or len(lora_a) == 0:
        return None
    active = getattr(module, "active_adapters", None) or list(lora_a.keys())
    return active[0] if isinstance(active, (list, tuple)) else active


def block_modules(model: torch.nn.Module, blocks: int = 3) -> list[str]:
    """Module names of the gradient features of the last ``blocks`` transformer blocks.

    PartitionSel's reference code (arXiv 2606.07954; ``grad_layer`` = the last 3 blocks) takes the
    per-example gradients of the LoRA A and B matrices of those blocks, or of the blocks' weights
    when no LoRA is used. Here: under peft, the ``lora_A`` / ``lora_B`` Linear of every LoRA-adapted
    module of those blocks (active adapter); without LoRA, every ``nn.Linear`` of those blocks
    (attention q, k, v, o and the MLP projections of a Llama). The blocks' norm scales are left out
    (a few thousand coordinates; docs/methods.md, deviations).

    Args:
        model: a decoder-only LM, possibly peft-wrapped.
        blocks: how many blocks, counted from the last; 0 = every block.

    Returns:
        Names usable with :func:`linear_grads` / :func:`capture_linear_factors`, block by block in
        module order (LoRA: ``A`` then ``B`` of each adapted module).

    Raises:
        ValueError: negative ``blocks``, no block list, or a peft model whose LoRA adapters miss
            the chosen blocks.
    """
    if blocks < 0:
        raise ValueError(f"blocks={blocks} must be >= 0 (0 = every transformer block)")
    list_name, layers = decoder_layers(model)
    lora = any(_lora_adapter(m) is not None for m in model.modules())
    first = 0 if blocks == 0 else max(0, len(layers) - blocks)
    names: list[str] = []
    for i in range(first, len(layers)):
        prefix = f"{list_name}.{i}" if list_name else str(i)
        for sub, mod in layers[i].named_modules():
            if lora:
                adapter = _lora_adapter(mod)
                if adapter is not None:
                    names += [f"{prefix}.{sub}.lora_A.{adapter}", f"{prefix}.{sub}.lora_B.{adapter}"]
            elif isinstance(mod, torch.nn.Linear):
                names.append(f"{prefix}.{sub}")
    if not names:
        what = "LoRA adapters" if lora else "nn.Linear layers"
        raise ValueError(
            f"no {what} in transformer blocks {first}..{len(layers) - 1} of {list_name!r}; adapt those blocks "
            "(model.lora.target_modules) or set selection.features.source=lm_head"
        )
    return names


def resolve_modules(
    model: torch.nn.Module, modules: str | torch.nn.Module | Sequence[str | torch.nn.Module]
) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) pairs for module names or modules; every one must be an ``nn.Linear``."""
    if isinstance(modules, (str, torch.nn.Module)):
        modules = [modules]
    names = {m: n for n, m in model.named_modules()}
    out: list[tuple[str, torch.nn.Linear]] = []
    for item in modules:
        if isinstance(item, str):
            try:
                mod = model.get_submodule(item)
            except AttributeError as err:
                raise ValueError(
                    f"module {item!r} not found; use a name from model.named_modules() or "
                    "find_last_module(model, 'v_proj')"
                ) from err
            name = item
        else:
            mod, name = item, names.get(item, type(item).__name__)
        if not isinstance(mod, torch.nn.Linear):
            hint = ""
            if hasattr(mod, "lora_B"):
                hint = f"; for a LoRA layer pass find_last_module(model, {name.split('.')[-1]!r})"
            raise ValueError(f"module {name!r} is a {type(mod).__name__}, not an nn.Linear{hint}")
        out.append((name, mod))
    if not out:
        raise ValueError("modules is empty; pass at least one module name, e.g. find_last_module(model)")
    return out


class _Capture:
    """Forward hooks recording each chosen module's input and output, and optionally the LM head's input.

    Attributes:
        records: per module name, the ``(input, output)`` pairs of the current row chunk.
        captured: ``{"h": head input}`` once the head's pre-hook has fired in the current chunk.
    """

    def __init__(self, targets: list[tuple[str, torch.nn.Linear]]) -> None:
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in targets}
        self.captured: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget what the previous row chunk recorded."""
        for name in self.records:
            self.records[name].clear()
        self.captured.clear()

    def outputs(self, targets: list[tuple[str, torch.nn.Linear]]) -> list[torch.Tensor]:
        """Each chosen module's output of the current chunk, in ``targets`` order.

        Raises:
            ValueError: a module ran other than exactly once in the forward.
        """
        outs = []
        for name, _ in targets:
            if len(self.records[name]) != 1:
                raise ValueError(
                    f"module {name!r} ran {len(self.records[name])} times in one forward; exactly once is supported"
                )
            outs.append(self.records[name][0][1])
        return outs


@contextlib.contextmanager
def _capturing(
    model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]], head: torch.nn.Module | None
) -> Iterator[_Capture]:
    """Hooks on ``targets`` (and a stopping pre-hook on ``head`` unless None); only their weights require grad.

    Every hook is removed and every parameter's ``requires_grad`` restored on exit.

    Args:
        model: the model whose parameters are toggled.
        targets: the chosen ``(name, module)`` pairs.
        head: the LM head at which the forward stops (its input captured), or None to run the model to the end.

    Yields:
        The :class:`_Capture` the hooks fill.
    """
    from mixsel.features.lm_head import _Stop

    capture = _Capture(targets)
    chosen = {id(p) for _, mod in targets for p in mod.parameters(recurse=False)}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    for name, mod in targets:

        def hook(_m: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
            capture.records[name].append((args[0].detach(), out))

        handles.append(mod.register_forward_hook(hook))

    def head_hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if "h" not in capture.captured:  # the body's output: stop the forward here (the head runs in target_logp)
            capture.captured["h"] = args[0]
            raise _Stop

    if head is not None:
        handles.append(head.register_forward_pre_hook(head_hook))
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in chosen)
        yield capture
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


def _chunk_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    rows: slice,
    labels: torch.Tensor,
    head: torch.nn.Module,
    capture: _Capture,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses (with autograd graph) and scalar stats of one row chunk.

    Args:
        model: the model (hooked by :func:`_capturing`).
        batch: the whole batch; ``rows`` of its tensors are fed to the model.
        rows: the row chunk.
        labels: ``batch["labels"][rows]`` on ``device``.
        head: the LM head, applied at the target positions when the forward stopped at it.
        capture: the hooks' records (``captured["h"]`` is read when the forward stopped).
        device: the model's device.

    Returns:
        (Tensor[rows] losses, stats of :func:`~mixsel.features.loss.stats_from_logits` form).
    """
    from mixsel.features.lm_head import _Stop, stats_from_logp, target_logp

    logits = None
    try:
        logits = model(**model_inputs({k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}, model))
        logits = logits.logits
    except _Stop:
        pass
    if logits is None:
        logp, tok_rows, counts = target_logp(head, capture.captured["h"], labels)
        total = torch.zeros(labels.shape[0], dtype=logp.dtype, device=device).index_add(0, tok_rows, -logp)
        losses = total / counts.clamp(min=1).to(logp.dtype)
        return losses, stats_from_logp(logp, tok_rows, counts)
    return per_example_loss(logits, labels), stats_from_logits(logits, labels)


class _FactorBuffers:
    """The ``[n, T, *]`` output-gradient and input buffers of every chosen module, filled chunk by chunk."""

    def __init__(self, size: int, n: int, width: int, device: torch.device) -> None:
        self.n, self.width, self.device = n, width, device
        self.out_bufs: list[torch.Tensor | None] = [None] * size
        self.in_bufs: list[torch.Tensor | None] = [None] * size

    def store(
        self,
        rows: slice,
        mask: torch.Tensor,
        inputs: list[torch.Tensor],
        outs: list[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
    ) -> None:
        """Write one row chunk: masked output gradients, and inputs (modules reading the same tensor share one).

        Args:
            rows: the row chunk.
            mask: BoolTensor[rows, T] of the chunk on the buffers' device.
            inputs: each module's captured input of the chunk.
            outs: each module's output of the chunk (its shape stands in for a None gradient).
            grads: each module's output gradient, None where unused (then zero).
        """
        n, width, device = self.n, self.width, self.device
        shared: dict[int, int] = {}  # modules that read the same input tensor share one buffer
        for k, (x, go) in enumerate(zip(inputs, grads)):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            if go is None:
                go = torch.zeros_like(outs[k])
            if self.out_bufs[k] is None:
                self.out_bufs[k] = torch.zeros(n, width, go.shape[-1], dtype=dtype, device=device)
            torch.mul(go.detach(), mask.unsqueeze(-1), out=self.out_bufs[k][rows])  # type: ignore[index]
            first = shared.setdefault(hash((x.data_ptr(), tuple(x.shape), x.stride())), k)
            if self.in_bufs[k] is None:
                self.in_bufs[k] = (
                    self.in_bufs[first]
                    if first != k and self.in_bufs[first] is not None
                    else torch.empty(n, width, x.shape[-1], dtype=dtype, device=device)
                )
            if first == k or self.in_bufs[k] is not self.in_bufs[first]:
                self.in_bufs[k][rows] = x.to(dtype)  # type: ignore[index]

    def factors(self, targets: list[tuple[str, torch.nn.Linear]], mask: torch.Tensor) -> list[GradFactors]:
        """One :class:`GradFactors` per module of ``targets`` over the whole batch."""
        return [
            GradFactors(out_grads=o, inputs=i, mask=mask, bias=mod.bias is not None)  # type: ignore[arg-type]
            for (_, mod), o, i in zip(targets, self.out_bufs, self.in_bufs)
        ]


def capture_linear_factors(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    modules: str | torch.nn.Module | Sequence[str | torch.nn.Module],
    *,
    graph_bytes: int = DEFAULT_GRAPH_BYTES,
) -> tuple[list[GradFactors], dict[str, torch.Tensor]]:
    """Factors of the per-example gradients of ``modules``' weights, from one forward and one backward.

    Forward hooks capture each module's input and output; one ``torch.autograd.grad`` of the summed
    per-example losses w.r.t. the captured outputs gives each example's output gradients (no parameter
    ``.grad`` is touched and the backward stops at the earliest captured module). Weights of the chosen
    modules are made to require grad for the call and every other parameter not to, so no autograd
    graph is kept before the first chosen module; everything is restored afterwards.

    The rows run in chunks whose graph fits in about ``graph_bytes``, and the LM head is applied at the
    target positions only (:func:`mixsel.features.lm_head.target_logp`, unless it is itself a chosen
    module or the model post-processes its logits): the ``[n, T, V]`` logits never exist. Modules that
    read the same input (q, k, v; gate, up) share one ``inputs`` tensor. ``out_grads`` are zero where
    ``mask`` is False; ``inputs`` are the raw layer inputs (they only ever meet ``out_grads``).

    Returns:
        (factors per module, stats) where stats holds ``loss``, ``confidence``, ``perplexity`` and
        ``completion_length`` of the same forward.
    """
    from mixsel.features.lm_head import _direct_head_reason

    targets = resolve_modules(model, modules)
    head = output_embeddings(model)
    stop_at_head = _direct_head_reason(model, head) is None and all(mod is not head for _, mod in targets)
    n, width = batch["input_ids"].shape[:2]
    device = next(model.parameters()).device
    attn = batch.get("attention_mask")
    mask_all = torch.ones(n, width, dtype=torch.bool) if attn is None else attn.bool()
    labels_all = batch["labels"]
    chunk = _graph_rows(model, targets, width, graph_bytes)
    bufs = _FactorBuffers(len(targets), n, width, device)
    stats_parts: list[dict[str, torch.Tensor]] = []
    with _capturing(model, targets, head if stop_at_head else None) as capture:
        for r0 in range(0, n, chunk):
            rows = slice(r0, min(r0 + chunk, n))
            capture.clear()
            labels = labels_all[rows].to(device)
            with torch.enable_grad():
                losses, stats = _chunk_losses(model, batch, rows, labels, head, capture, device)
                stats_parts.append(stats)
                outs = capture.outputs(targets)
                if losses.requires_grad:
                    grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
                else:  # no target token in the chunk: every gradient is zero
                    grads = (None,) * len(outs)
            inputs = [capture.records[name][0][0] for name, _ in targets]
            bufs.store(rows, mask_all[rows].to(device), inputs, outs, grads)
    stats = {key: torch.cat([part[key] for part in stats_parts]) for key in stats_parts[0]} if stats_parts else {}
    return bufs.factors(targets, mask_all.to(device)), stats


def _graph_rows(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]], width: int, budget: int) -> int:
    """Rows per chunk of :func:`capture_linear_factors` whose autograd graph fits in about ``budget`` bytes."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0) or max(m.in_features for _, m in targets)
    inter = int(getattr(config, "intermediate_size", 0) or 0) or 4 * hidden
    names = [name for name, _ in targets]
    blocks = {n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n} or {"all"}
    layers = len(blocks) if "all" not in blocks else int(getattr(config, "num_hidden_layers", 1) or 1)
    per_row = (layers + 1) * (3 * inter + 10 * hidden) * width * 4
    return max(1, int(budget // max(per_row, 1)))


def linear_grads(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    modules: str | torch.nn.Module | Sequence[str | torch.nn.Module],
) -> torch.Tensor:
    """Exact per-example gradients w.r.t. the weights (and biases) of ``modules``, concatenated.

    Args:
        model: a Hugging Face causal LM (dropout off), possibly peft-wrapped.
        batch: dict(input_ids, attention_mask, labels).
        modules: a name / module or a list of them (``nn.Linear``, incl. peft ``lora_A.default`` /
            ``lora_B.default``); a list gives the concatenation in that order.

    Returns:
        Tensor[n, sum_k D_k], per module ``weight.flatten()`` then ``bias``.
    """
    factors, _ = capture_linear_factors(model, batch, modules)
    return torch.cat([materialize_grads(f) for f in factors], dim=1)


def linear_gram(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    modules: str | torch.nn.Module | Sequence[str | torch.nn.Module],
    other: dict[str, torch.Tensor] | None = None,
    *,
    method: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    max_bytes: int = DEFAULT_MAX_BYTES,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Inner products of the per-example gradients of ``modules`` (summed over the modules).

    Args: as :func:`linear_grads`, plus ``other`` (a second batch for the cross Gram) and the backend
    options of :func:`last_layer_gram`. The info lists the backend used per module.
    """
    factors, _ = capture_linear_factors(model, batch, modules)
    others = capture_linear_factors(model, other, modules)[0] if other is not None else [None] * len(factors)
    k = None
    infos = []
    for f, g in zip(factors, others):
        kk, info = factor_gram(f, g, method=method, chunk=chunk, max_bytes=max_bytes)
        infos.append(info)
        k = kk if k is None else k + kk
    methods = [i["method"] for i in infos]
    log.info("linear_gram: backends %s for %d module(s)", methods, len(infos))
    info = {"method": methods[0] if len(set(methods)) == 1 else "mixed", "modules": infos}
    return (k, info) if return_info else k
