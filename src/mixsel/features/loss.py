"""Per-example scalar signals and the LM-head gradient factors, from one no-grad forward of the pool.

The per-example loss is the mean cross-entropy over that example's target tokens (labels != -100) with
the Hugging Face shift: ``logits[:, :-1]`` predict ``labels[:, 1:]``. An example with no target token has
loss 0 (and a zero gradient); nothing is divided by zero.

The gradient of example ``i``'s loss w.r.t. its logits at position ``t`` is
``e_it = (softmax(z_it) - onehot(y_it)) / c_i`` (``c_i`` = number of target tokens), so the gradient
w.r.t. the LM head weight ``W`` (``logits = h W^T``) is ``sum_t e_it h_it^T``: a sum of rank-one terms
that the same forward already provides. :func:`forward_stats` keeps these factors in a
:class:`GradFactors` record so that the gradient features (``mixsel.features.grads``) never repeat the
pool forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mixsel.features.hidden import mean_pool

__all__ = [
    "GradFactors",
    "LMHeadFactors",
    "forward_stats",
    "lm_head_factors",
    "per_example_loss",
    "stats_from_logits",
    "target_mask",
    "token_losses",
]

IGNORE_INDEX = -100


@dataclass
class GradFactors:
    """Rank-one factors of per-example gradients of a linear map ``y = x W^T (+ b)``.

    Example ``i``'s gradient w.r.t. ``W`` (shape ``[P, Q]``) is ``sum_t out_grads[i, t] inputs[i, t]^T``;
    with ``bias=True`` the bias gradient ``sum_t out_grads[i, t]`` is appended (flattened after ``W``).

    Attributes:
        out_grads: Tensor[n, T, P], gradient of example i's loss w.r.t. the layer output (zero where
            the position does not contribute).
        inputs: Tensor[n, T, Q], the layer input (zero where ``mask`` is False).
        mask: BoolTensor[n, T], positions that contribute (targets for the LM head, attended tokens
            for a hidden linear layer).
        bias: whether the layer has a bias whose gradient is part of the feature.
    """

    out_grads: torch.Tensor
    inputs: torch.Tensor
    mask: torch.Tensor
    bias: bool = False

    @property
    def n(self) -> int:
        return int(self.out_grads.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(P, Q)`` of the weight gradient (without the bias)."""
        return int(self.out_grads.shape[-1]), int(self.inputs.shape[-1])

    @property
    def dim(self) -> int:
        """Length of one flattened per-example gradient."""
        p, q = self.shape
        return p * q + (p if self.bias else 0)

    # Names used for the LM head (``err`` = softmax minus one-hot over the count, ``h`` = hidden state).
    @property
    def err(self) -> torch.Tensor:
        return self.out_grads

    @property
    def h(self) -> torch.Tensor:
        return self.inputs

    @property
    def counts(self) -> torch.Tensor:
        """Number of contributing positions per example."""
        return self.mask.sum(1)

    def to(self, dtype: torch.dtype) -> GradFactors:
        return GradFactors(self.out_grads.to(dtype), self.inputs.to(dtype), self.mask, self.bias)

    def inputs_with_bias(self) -> torch.Tensor:
        """``inputs`` with a column of ones appended when ``bias`` (masked positions stay zero)."""
        if not self.bias:
            return self.inputs
        ones = self.mask.unsqueeze(-1).to(self.inputs.dtype)
        return torch.cat([self.inputs, ones], dim=-1)


#: The LM-head factors: ``err`` [n, T, V] and ``h`` [n, T, H] (see :class:`GradFactors`).
LMHeadFactors = GradFactors


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """BoolTensor[n, T-1]: which shifted positions (``labels[:, 1:]``) are targets."""
    return labels[:, 1:] != IGNORE_INDEX


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy with the Hugging Face shift (differentiable); 0 where not a target.

    Args:
        logits: Tensor[n, T, V] next-token logits of a causal LM.
        labels: LongTensor[n, T]; -100 marks ignored tokens.

    Returns:
        Tensor[n, T - 1]: ``CE(logits[i, t], labels[i, t + 1])`` at target positions
        (:func:`target_mask`), 0 elsewhere.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [n, T, V] and labels [n, T]; got logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.masked_fill(~mask, 0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return ce * mask


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean token cross-entropy with the Hugging Face shift (differentiable).

    Args:
        logits: Tensor[n, T, V] next-token logits of a causal LM.
        labels: LongTensor[n, T]; -100 marks ignored tokens.

    Returns:
        Tensor[n]: ``sum_t CE(logits[i, t], labels[i, t + 1]) / max(1, #targets_i)`` over target
        positions; 0 for an example without targets.
    """
    return token_losses(logits, labels).sum(1) / target_mask(labels).sum(1).clamp(min=1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lm_head_factors(
    hidden: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *, trim: bool = True
) -> GradFactors:
    """LM-head gradient factors from the head's input ``hidden`` and its ``logits``.

    ``err[i, t] = (softmax(logits[i, t]) - onehot(labels[i, t + 1])) / c_i`` at target positions (zero
    elsewhere) and ``h[i, t] = hidden[i, t]`` (zeroed where not a target), so that example ``i``'s
    gradient of :func:`per_example_loss` w.r.t. the head weight is ``err_i^T h_i`` (PartitionSel's
    memory-efficient last-layer gradient; GREATS' ghost factors).

    Args:
        hidden: Tensor[n, T, H] input of the LM head (after the final norm).
        logits: Tensor[n, T, V].
        labels: LongTensor[n, T], -100 = ignored.
        trim: drop the time positions where no example has a target (saves memory and time).
    """
    dtype = _compute_dtype(logits.dtype)
    mask = target_mask(labels)
    h, z, y = hidden[:, :-1], logits[:, :-1], labels[:, 1:]
    if trim:
        keep = mask.any(0)
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            mask, h, z, y = mask[:, idx], h[:, idx], z[:, idx], y[:, idx]
    err = torch.softmax(z.to(dtype), dim=-1)
    err.scatter_add_(-1, y.masked_fill(~mask, 0).unsqueeze(-1), -torch.ones_like(err[..., :1]))
    scale = mask.to(dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(dtype)
    err.mul_(scale.unsqueeze(-1))
    h = h.to(dtype) * mask.unsqueeze(-1)
    return GradFactors(out_grads=err, inputs=h, mask=mask, bias=False)


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head module of a Hugging Face causal LM (peft-wrapped or not)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "pass a Hugging Face causal LM such as LlamaForCausalLM."
        )
    return head


def model_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """``input_ids`` / ``attention_mask`` of ``batch`` on the model's device, without labels."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; pass dict(input_ids, attention_mask, labels)")
    device = next(model.parameters()).device
    out: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device)
    return out


def stats_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss``, ``confidence``, ``perplexity`` and ``completion_length`` (each [n]) from logits."""
    logits = logits.detach()
    dtype = _compute_dtype(logits.dtype)
    mask = target_mask(labels)
    counts = mask.sum(1)
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    tok_logp = logp.gather(-1, labels[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask
    denom = counts.clamp(min=1).to(dtype)
    loss = -tok_logp.sum(1) / denom
    return {
        "loss": loss,
        "confidence": (tok_logp.exp() * mask).sum(1) / denom,
        "perplexity": loss.exp(),
        "completion_length": counts.to(dtype),
    }


def forward_stats(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    hidden: bool = False,
    factors: bool = False,
) -> dict[str, Any]:
    """Scalar signals (and optionally pooled hidden states and LM-head factors) from ONE no-grad forward.

    Without ``factors`` this is :func:`mixsel.features.lm_head.head_pass`: an inference-mode pass in
    row chunks that applies the LM head only at target positions and never holds the ``[n, T, V]``
    logits. With ``factors`` the whole batch runs at once and ``err`` [n, T', V] is materialised.

    Args:
        model: a Hugging Face causal LM (peft-wrapped is fine); dropout should be off (``eval()``).
        batch: dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 = ignored).
        hidden: also return ``hidden`` [n, H], the LM head's input (last hidden state after the final
            norm) mean-pooled over attended tokens.
        factors: also return ``lm_head``, a :class:`GradFactors` with ``err`` [n, T', V] and ``h``
            [n, T', H] for the LM-head gradient features.

    Returns:
        dict with ``loss`` [n] (mean target-token CE), ``confidence`` [n] (mean target-token
        probability), ``perplexity`` [n] (``exp(loss)``), ``completion_length`` [n] (number of target
        tokens, float), and ``hidden`` / ``lm_head`` when asked.
    """
    if not factors:
        from mixsel.features.lm_head import head_pass

        return head_pass(model, batch, hidden=hidden)
    return _full_forward_stats(model, batch, hidden=hidden)


def _full_forward_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool) -> dict[str, Any]:
    """The whole batch in one no-grad forward with its full logits, and the LM-head factors."""
    head = output_embeddings(model)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured["h"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = model(**model_inputs(batch, model))
    finally:
        handle.remove()
    logits = out.logits
    labels = batch["labels"].to(logits.device)
    dtype = _compute_dtype(logits.dtype)
    result: dict[str, Any] = stats_from_logits(logits, labels)
    if hidden:
        attn = batch.get("attention_mask")
        result["hidden"] = mean_pool(captured["h"].to(dtype), None if attn is None else attn.to(logits.device))
    result["lm_head"] = lm_head_factors(captured["h"], logits, labels)
    return result
