"""One chunked inference pass over a pool, and the LM-head gradient features from its compact output.

:func:`head_pass` runs the model's body over the pool in row chunks under ``torch.inference_mode``,
stops each chunk at the LM head (a pre-hook captures the head's input), and applies the head only
at the **target** positions, a few thousand tokens at a time, reducing each block of logits at once
to the log-partition and the target logit. It never holds the ``[n, T, V]`` logits (nor anything of
size ``V`` per token for the whole pool), keeps no autograd graph and works in float32 (float64 for
a float64 model). What it returns:

* the scalar signals (``loss``, ``confidence``, ``perplexity``, ``completion_length``) and the pooled
  head input (``hidden``), as :func:`mixsel.features.loss.forward_stats` defines them;
* with ``tokens=True``, a :class:`HeadTokens`: the head input at the target positions packed per
  example (``[n, T', H]``), the targets, the log-partitions and ``1 / c_i`` - everything the exact
  LM-head gradients ``G_i = sum_t (softmax(z_it) - onehot(y_it)) h_it^T / c_i`` need.

The gradient features are then computed **by blocks of the vocabulary** (rows of ``G_i``): a block's
logits are recomputed from ``h`` (one matmul), turned into softmax-minus-one-hot with the stored
log-partitions, and multiplied into ``G_b = err_b^T h`` ``[n, V_b, H]``; Grams accumulate
``G_b G_b'^T``, Kronecker projections accumulate ``err_b P_out[b]``. Nothing of size ``n x V x H``
exists at once (``DEFAULT_BLOCK_BYTES`` bounds a block), and the result is the exact Gram (the same
sum in another order; float rounding differs in the last bits).

When the head is not a plain ``nn.Linear`` (e.g. LoRA on the head) or the model post-processes its
logits (``final_logit_softcapping``, ``logit_scale``), :func:`head_pass` says so in the log and uses
the model's own logits, chunked over rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mixsel.features.hidden import mean_pool
from mixsel.features.loss import GradFactors, output_embeddings
from mixsel.features.projection import KroneckerProjector

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_KEEP_ERR_BYTES",
    "HeadTokens",
    "head_grads",
    "head_gram",
    "head_pass",
    "head_project",
    "head_sq_norms",
    "stats_from_logp",
    "target_logp",
    "target_losses",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_ROW_BYTES = 256 * 2**20  # activations of one row chunk of the body forward (rough bound)
DEFAULT_TOKEN_BYTES = 32 * 2**20  # logits of one token chunk at the head
DEFAULT_BLOCK_BYTES = 32 * 2**20  # one vocabulary block of per-example gradients [n, V_b, H]
DEFAULT_KEEP_ERR_BYTES = 192 * 2**20  # the exact LM-head Grams keep softmax - onehot [n, T', V] up to this
_WARNED: set[str] = set()


class _Stop(Exception):
    """Raised by the head's pre-hook: the body's output is captured, the head is applied here."""


@dataclass
class HeadTokens:
    """The LM head's inputs at the target positions of a batch, packed per example.

    Example ``i``'s LM-head gradient (of its mean target-token loss) is
    ``G_i = sum_t scale[i, t] (softmax(h[i, t] W^T + b) - onehot(targets[i, t])) h[i, t]^T``.

    Attributes:
        h: Tensor[n, T', H] head input at example i's t-th target position (zero padding after its
            ``c_i`` targets), in the compute dtype (float32, or float64 for a float64 model).
        targets: LongTensor[n, T'] the target token ids (0 on padding).
        lse: Tensor[n, T'] log-partition ``logsumexp(z)`` of the logits at those positions (0 on padding).
        scale: Tensor[n, T'] ``1 / c_i`` at targets, 0 on padding.
        weight: the head's weight [V, H] (a view, not a copy); ``bias`` its bias or None.
        err_out: Tensor[n, T', d_out] ``(softmax - onehot) P_out`` (without ``scale``) when
            :func:`head_pass` was given ``projector`` (the same object), else None.
        err: Tensor[n, T', V] ``scale * (softmax - onehot)`` when the pass kept it (``keep_err_bytes``),
            else None (then :meth:`err_block` recomputes each block from ``h``).
    """

    h: torch.Tensor
    targets: torch.Tensor
    lse: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    err_out: torch.Tensor | None = None
    projector: KroneckerProjector | None = None
    err: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.h.shape[0])

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.h.shape[-1])

    @property
    def dim(self) -> int:
        """Length of one flattened gradient ``V * H``."""
        return self.vocab * self.hidden

    def err_block(self, v0: int, v1: int) -> torch.Tensor:
        """Tensor[n, T', v1 - v0]: ``scale * (softmax - onehot)`` restricted to vocabulary rows ``[v0, v1)``."""
        if self.err is not None:  # kept by the pass: a view
            return self.err[:, :, v0:v1]
        w = self.weight[v0:v1].to(self.h.dtype)
        b = None if self.bias is None else self.bias[v0:v1].to(self.h.dtype)
        z = F.linear(self.h, w, b)
        err = torch.exp(z - self.lse.unsqueeze(-1))
        inside = (self.targets >= v0) & (self.targets < v1) & (self.scale > 0)
        idx = (self.targets - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)
        err.scatter_add_(-1, idx, -inside.to(err.dtype).unsqueeze(-1))
        return err.mul_(self.scale.unsqueeze(-1))

    def blocks(self, other: HeadTokens | None = None, *, max_bytes: int = DEFAULT_BLOCK_BYTES) -> list[tuple[int, int]]:
        """Vocabulary blocks ``[v0, v1)`` whose error and gradient blocks (both batches) fit in ``max_bytes``."""
        per_row = self.n * (self.hidden + self.h.shape[1])
        if other is not None:
            per_row += other.n * (other.hidden + other.h.shape[1])
        size = max(1, min(self.vocab, int(max_bytes // max(per_row * self.h.element_size(), 1))))
        return [(v0, min(v0 + size, self.vocab)) for v0 in range(0, self.vocab, size)]

    def to_factors(self) -> GradFactors:
        """The same gradients as :class:`~mixsel.features.loss.GradFactors` (``err`` [n, T', V] materialised)."""
        return GradFactors(out_grads=self.err_block(0, self.vocab), inputs=self.h, mask=self.scale > 0, bias=False)

    def grad_block(self, v0: int, v1: int) -> torch.Tensor:
        """Tensor[n, (v1 - v0) * H]: rows ``[v0, v1)`` of every ``G_i``, flattened row-major."""
        g = self.err_block(v0, v1).transpose(1, 2) @ self.h  # [n, V_b, H]
        return g.reshape(self.n, -1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _direct_head_reason(model: torch.nn.Module, head: torch.nn.Module) -> str | None:
    """Why the head cannot be applied by hand (then the model's own logits are used), or None."""
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"the model post-processes its logits (config.{attr})"
    return None


def _rows_per_chunk(model: torch.nn.Module, batch: dict[str, torch.Tensor], max_bytes: int) -> int:
    config = getattr(model, "config", None)
    width = int(getattr(config, "intermediate_size", 0) or 0) + 4 * int(getattr(config, "hidden_size", 0) or 0)
    per_row = max(width, 1) * int(batch["input_ids"].shape[1]) * 4
    return max(1, int(max_bytes // per_row))


def _token_chunks(counts: torch.Tensor, step: int) -> list[tuple[int, int]]:
    """Ranges of packed target tokens holding whole examples, about ``step`` tokens each (one example at least)."""
    out: list[tuple[int, int]] = []
    start = end = 0
    for c in counts.tolist():
        if end > start and end + c - start > step:
            out.append((start, end))
            start = end
        end += c
    if end > start:
        out.append((start, end))
    return out


def _inputs(batch: dict[str, torch.Tensor], rows: slice, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"input_ids": batch["input_ids"][rows].to(device), "use_cache": False}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"][rows].to(device)
    return out


def _warn_fallback(reason: str | None) -> None:
    """Log once per distinct ``reason`` that :func:`head_pass` uses the model's own logits (None: nothing)."""
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("head_pass: %s; using the model's own logits (chunked over rows)", reason)


@contextlib.contextmanager
def _head_input(head: torch.nn.Module, *, stop: bool) -> Iterator[dict[str, torch.Tensor]]:
    """A pre-hook on ``head`` storing its input as ``captured["h"]``; removed on exit.

    Args:
        head: the LM head.
        stop: raise :class:`_Stop` from the hook, ending the forward before the head runs.

    Yields:
        The ``captured`` dict the hook fills (clear it before each forward).
    """
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured["h"] = args[0]
        if stop:
            raise _Stop

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def _check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when ``batch`` lacks ``input_ids`` or ``labels``."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; pass dict(input_ids, attention_mask, labels)")


@dataclass
class _PassBuffers:
    """What :func:`head_pass` accumulates over its row chunks (inference tensors).

    Attributes:
        tok_logp: Tensor[n, T'] target-token log-probabilities, packed per example.
        sq: Tensor[n] ``||G_i||^2`` with ``sq_norms``, else None.
        packed: with ``tokens``, ``h`` / ``targets`` / ``lse`` (and ``err_out``, ``err``) packed per example;
            empty without.
        p_out: the projector's output-side matrix [V, d_out], or None.
        hidden: the pooled head inputs of the rows so far, or None.
    """

    tok_logp: torch.Tensor
    sq: torch.Tensor | None
    packed: dict[str, torch.Tensor]
    p_out: torch.Tensor | None
    hidden: torch.Tensor | None = None


def _pass_buffers(
    head: torch.nn.Module,
    counts: torch.Tensor,
    dtype: torch.dtype,
    *,
    tokens: bool,
    sq_norms: bool,
    projector: KroneckerProjector | None,
    keep_err_bytes: int,
) -> _PassBuffers:
    """Zero buffers of :func:`head_pass`, each example's targets packed into ``T' = max(counts)`` slots.

    Args:
        head: the LM head (its weight gives ``V`` and ``H``).
        counts: LongTensor[n] targets per example, on the device the buffers live on.
        dtype: the compute dtype.
        tokens: allocate the packed :class:`HeadTokens` tensors.
        sq_norms: allocate ``sq``.
        projector: with ``tokens``, also allocate ``err_out`` for its output side.
        keep_err_bytes: with ``tokens``, allocate ``err`` [n, T', V] when it takes at most this many bytes.
    """
    n, device = int(counts.shape[0]), counts.device
    width = int(counts.max()) if n else 0
    tok_logp = torch.zeros(n, width, dtype=dtype, device=device)
    packed: dict[str, torch.Tensor] = {}
    vocab = int(head.weight.shape[0])
    p_out = None if projector is None else projector.p_out.matrix(dtype, device)
    sq = torch.zeros(n, dtype=dtype, device=device) if sq_norms else None
    if tokens:
        h_dim = int(head.weight.shape[1])
        packed = {
            "h": torch.zeros(n, width, h_dim, dtype=dtype, device=device),
            "targets": torch.zeros(n, width, dtype=torch.long, device=device),
            "lse": torch.zeros(n, width, dtype=dtype, device=device),
        }
        if p_out is not None:
            packed["err_out"] = torch.zeros(n, width, p_out.shape[1], dtype=dtype, device=device)
        if n * width * vocab * torch.finfo(dtype).bits // 8 <= keep_err_bytes:
            packed["err"] = torch.zeros(n, width, vocab, dtype=dtype, device=device)
    return _PassBuffers(tok_logp=tok_logp, sq=sq, packed=packed, p_out=p_out)


def _add_sq_norms(
    sq: torch.Tensor, err: torch.Tensor, hh: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor
) -> None:
    """Write ``||G_i||^2 = sum_{t,s} (e_t . e_s)(h_t . h_s) / c_i^2`` into ``sq`` for the whole examples of a chunk.

    Args:
        sq: Tensor[n] to write into.
        err: Tensor[N, V] softmax minus one-hot of the chunk's target tokens.
        hh: Tensor[N, H] their head inputs, in the compute dtype.
        seg: LongTensor[N] their example (consecutive runs).
        counts: LongTensor[n] targets per example.
    """
    for i in torch.unique_consecutive(seg).tolist():
        sel = seg == i
        e_i, h_i = err[sel], hh[sel]
        sq[i] = ((e_i @ e_i.T) * (h_i @ h_i.T)).sum() / counts[i].to(sq.dtype) ** 2


def _head_rows(
    head: torch.nn.Module,
    bufs: _PassBuffers,
    h_full: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor,
    r0: int,
    counts: torch.Tensor,
    *,
    token_bytes: int,
) -> None:
    """Reduce one row chunk's target positions into ``bufs``, a few thousand tokens (whole examples) at a time.

    Args:
        head: the LM head (applied by hand when ``logits`` is None).
        bufs: the pass's buffers (the packed tensors and ``sq`` are filled where allocated).
        h_full: Tensor[rows, T, H] the head input of the chunk.
        logits: Tensor[rows, T, V] the model's own logits, or None.
        labels: LongTensor[rows, T - 1] the shifted labels of the chunk.
        mask: BoolTensor[rows, T - 1] its target positions.
        r0: the chunk's first row.
        counts: LongTensor[n] targets per example (whole batch).
        token_bytes: budget of one block of logits.
    """
    packed, p_out, sq, dtype = bufs.packed, bufs.p_out, bufs.sq, bufs.tok_logp.dtype
    tokens = "h" in packed
    vocab = int(head.weight.shape[0])
    # position of each target inside its example's packed row
    slot = (mask.cumsum(1) - 1)[mask]
    ex = mask.nonzero()[:, 0] + r0
    y = labels[mask]
    h_t = h_full[:, :-1][mask]
    z_all = None if logits is None else logits[:, :-1][mask]
    step = max(1, int(token_bytes // (4 * vocab)))
    for t0, t1 in _token_chunks(mask.sum(1), step):  # whole examples per chunk
        z = F.linear(h_t[t0:t1], head.weight, head.bias).to(dtype) if z_all is None else z_all[t0:t1].to(dtype)
        lse = torch.logsumexp(z, dim=-1)
        yy = y[t0:t1, None]
        bufs.tok_logp[ex[t0:t1], slot[t0:t1]] = z.gather(-1, yy).squeeze(-1) - lse
        if tokens:
            packed["lse"][ex[t0:t1], slot[t0:t1]] = lse
        if p_out is not None or sq is not None or "err" in packed:  # softmax - onehot of these tokens
            err = torch.exp(z.sub_(lse.unsqueeze(-1)))
            err.scatter_add_(-1, yy, -torch.ones_like(yy, dtype=dtype))
            if p_out is not None:  # the Kronecker projection's output side
                packed["err_out"][ex[t0:t1], slot[t0:t1]] = err @ p_out
            if "err" in packed:  # kept for the exact Grams: no second pass over the vocabulary
                packed["err"][ex[t0:t1], slot[t0:t1]] = err
            if sq is not None:  # example by example
                _add_sq_norms(sq, err, h_t[t0:t1].to(dtype), ex[t0:t1], counts)
        del z
    if tokens:
        packed["h"][ex, slot] = h_t.to(dtype)
        packed["targets"][ex, slot] = y


def _pass_signals(
    bufs: _PassBuffers,
    counts: torch.Tensor,
    mask_all: torch.Tensor,
    *,
    hidden: bool,
    token_losses: bool,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The scalar signals (and asked-for extras) of :func:`head_pass` from its filled buffers.

    Args:
        bufs: the filled buffers.
        counts: LongTensor[n] targets per example.
        mask_all: BoolTensor[n, T - 1] target positions.
        hidden: include ``hidden``.
        token_losses: include ``token_losses``.

    Returns:
        (result dict of inference tensors, Tensor[n, T'] ``scale`` = ``1 / c_i`` at targets, 0 on padding).
    """
    tok_logp = bufs.tok_logp
    dtype, device, width = tok_logp.dtype, tok_logp.device, tok_logp.shape[1]
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    denom = counts.clamp(min=1).to(dtype)
    loss = -(tok_logp * valid).sum(1) / denom
    result: dict[str, Any] = {
        "loss": loss,
        "confidence": (tok_logp.exp() * valid).sum(1) / denom,
        "perplexity": loss.exp(),
        "completion_length": counts.to(dtype),
    }
    if hidden:
        result["hidden"] = bufs.hidden if bufs.hidden is not None else torch.zeros(0, dtype=dtype)
    if bufs.sq is not None:
        result["grad_sq_norm"] = bufs.sq
    if token_losses:
        per_token = torch.zeros(mask_all.shape, dtype=dtype, device=device)
        per_token[mask_all] = -tok_logp[valid]
        result["token_losses"] = per_token
    return result, valid.to(dtype) / denom[:, None]


def _head_tokens(
    head: torch.nn.Module, packed: dict[str, torch.Tensor], scale: torch.Tensor, projector: KroneckerProjector | None
) -> HeadTokens:
    """The :class:`HeadTokens` of a pass, its tensors cloned out of inference mode (``err`` excepted)."""
    return HeadTokens(
        h=packed["h"].clone(),
        targets=packed["targets"].clone(),
        lse=packed["lse"].clone(),
        scale=scale.clone(),
        weight=head.weight.detach(),
        bias=None if head.bias is None else head.bias.detach(),
        err_out=packed["err_out"].clone() if "err_out" in packed else None,
        projector=projector,
        err=packed.get("err"),  # not cloned (the largest tensor); only read, by the Gram functions
    )


def head_pass(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    hidden: bool = False,
    tokens: bool = False,
    token_losses: bool = False,
    sq_norms: bool = False,
    projector: KroneckerProjector | None = None,
    keep_err_bytes: int = 0,
    row_bytes: int = DEFAULT_ROW_BYTES,
    token_bytes: int = DEFAULT_TOKEN_BYTES,
) -> dict[str, Any]:
    """Scalar signals (and pooled hidden states, and :class:`HeadTokens`) from one chunked inference pass.

    Args:
        model: a Hugging Face causal LM (peft-wrapped is fine); dropout should be off (``eval()``).
        batch: dict with ``input_ids``, ``attention_mask`` and ``labels`` (-100 = ignored).
        hidden: also return ``hidden`` [n, H], the head input mean-pooled over attended tokens.
        tokens: also return ``head_tokens``, the :class:`HeadTokens` of the batch.
        token_losses: also return ``token_losses`` [n, T - 1], each target token's cross-entropy at
            its position (0 elsewhere; :func:`mixsel.features.loss.token_losses`).
        sq_norms: also return ``grad_sq_norm`` [n], ``||G_i||^2`` of the LM-head gradients, from the
            logits at hand (the ghost identity within each example; no second pass).
        projector: with ``tokens``, a :class:`~mixsel.features.projection.KroneckerProjector` of the
            head's ``(V, H)``: the output side ``(softmax - onehot) P_out`` is computed from the logits
            already at hand (``HeadTokens.err_out``), so :func:`head_project` needs no second pass.
        keep_err_bytes: with ``tokens``, keep ``HeadTokens.err`` (``[n, T', V]``) when it takes at most
            this many bytes, so that the exact Grams need no second pass over the vocabulary.
        row_bytes: rough activation budget of one row chunk of the body forward.
        token_bytes: budget of one block of logits at the head.

    Returns:
        dict with ``loss``, ``confidence``, ``perplexity``, ``completion_length`` (each [n]) and
        ``hidden`` / ``head_tokens`` when asked; plain (not inference-mode) tensors.
    """
    _check_batch(batch)
    head = output_embeddings(model)
    device = next(model.parameters()).device
    reason = _direct_head_reason(model, head)
    _warn_fallback(reason)
    n, _seq = batch["input_ids"].shape
    labels_all = batch["labels"].to(device)
    mask_all = labels_all[:, 1:] != IGNORE_INDEX
    counts = mask_all.sum(1)
    chunk = min(max(n, 1), _rows_per_chunk(model, batch, row_bytes))
    with torch.inference_mode():
        dtype = _compute_dtype(next(model.parameters()).dtype)
        bufs = _pass_buffers(
            head, counts, dtype, tokens=tokens, sq_norms=sq_norms, projector=projector, keep_err_bytes=keep_err_bytes
        )
        with _head_input(head, stop=reason is None) as captured:
            for r0 in range(0, n, chunk):
                rows = slice(r0, min(r0 + chunk, n))
                captured.clear()
                logits = None
                with contextlib.suppress(_Stop):
                    logits = model(**_inputs(batch, rows, device)).logits
                h_full = captured["h"]
                if hidden:
                    attn = batch.get("attention_mask")
                    pooled = mean_pool(h_full.to(dtype), None if attn is None else attn[rows].to(device))
                    bufs.hidden = pooled if bufs.hidden is None else torch.cat([bufs.hidden, pooled])
                labels = labels_all[rows, 1:]
                _head_rows(head, bufs, h_full, logits, labels, mask_all[rows], r0, counts, token_bytes=token_bytes)
                del logits, h_full
        result, scale = _pass_signals(bufs, counts, mask_all, hidden=hidden, token_losses=token_losses)
        if "err" in bufs.packed:
            bufs.packed["err"].mul_(scale.unsqueeze(-1))
    # cloned outside inference mode: plain tensors that later code may modify in place
    out: dict[str, Any] = {k: v.clone() for k, v in result.items()}
    if tokens:
        out["head_tokens"] = _head_tokens(head, bufs.packed, scale, projector)
    return out


def target_logp(
    head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, *, token_bytes: int = DEFAULT_TOKEN_BYTES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens under ``head(h)``, the head applied at target positions only.

    Differentiable (autograd keeps one ``[tokens, V]`` block per chunk, never the ``[n, T, V]`` logits).

    Args:
        head: the LM head (any module mapping [..., H] to [..., V]).
        h: Tensor[n, T, H] its input (after the final norm).
        labels: LongTensor[n, T], -100 = ignored (Hugging Face shift: ``h[:, t]`` predicts ``labels[:, t + 1]``).

    Returns:
        ``(logp, rows, counts)``: Tensor[N] the target tokens' log-probabilities (row-major order),
        LongTensor[N] their example, LongTensor[n] targets per example.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    h_t, y = h[:, :-1][mask], labels[:, 1:][mask]
    rows = mask.nonzero()[:, 0]
    dtype = _compute_dtype(h.dtype)
    vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    step = max(1, int(token_bytes // (4 * vocab)))
    parts = []
    for t0 in range(0, h_t.shape[0], step):
        z = head(h_t[t0 : t0 + step]).to(dtype)
        parts.append(z.gather(-1, y[t0 : t0 + step, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    logp = torch.cat(parts) if parts else h_t.new_zeros(0, dtype=dtype)
    return logp, rows, mask.sum(1)


def target_losses(
    head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, *, token_bytes: int = DEFAULT_TOKEN_BYTES
) -> torch.Tensor:
    """Per-example mean target-token cross-entropy of ``head(h)``, the head applied at target positions only.

    Equals ``per_example_loss(head(h), labels)`` without the ``[n, T, V]`` logits (:func:`target_logp`).
    """
    logp, rows, counts = target_logp(head, h, labels, token_bytes=token_bytes)
    total = torch.zeros(labels.shape[0], dtype=logp.dtype, device=h.device).index_add(0, rows, -logp)
    return total / counts.clamp(min=1).to(logp.dtype)


def stats_from_logp(logp: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss``, ``confidence``, ``perplexity``, ``completion_length`` (each [n]) from target log-probabilities."""
    logp = logp.detach()
    n = counts.shape[0]
    denom = counts.clamp(min=1).to(logp.dtype)
    loss = -torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp) / denom
    conf = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp.exp()) / denom
    return {"loss": loss, "confidence": conf, "perplexity": loss.exp(), "completion_length": counts.to(logp.dtype)}


# --------------------------------------------------------------------------------------------------
# gradient features from HeadTokens, by vocabulary blocks
# --------------------------------------------------------------------------------------------------


def head_gram(f: HeadTokens, g: HeadTokens | None = None, *, max_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``K[i, j] = <G_i, G'_j>`` (Tensor[n, m]; [n, n] when ``g`` is None), exact, by vocabulary blocks."""
    if g is not None and (g.vocab, g.hidden) != (f.vocab, f.hidden):
        raise ValueError(f"head shapes differ: {(f.vocab, f.hidden)} vs {(g.vocab, g.hidden)}")
    with torch.inference_mode():
        k = f.h.new_zeros(f.n, f.n if g is None else g.n)
        for v0, v1 in f.blocks(g, max_bytes=max_bytes):
            a = f.grad_block(v0, v1)
            if g is None:
                k.addmm_(a, a.T)
            else:
                k.addmm_(a, g.grad_block(v0, v1).to(a.dtype).T)
    return k.clone()


def head_grams(
    f: HeadTokens, g: HeadTokens | None, need: set[str], *, max_bytes: int = DEFAULT_BLOCK_BYTES
) -> dict[str, torch.Tensor]:
    """``gram`` (f, f), ``cross`` (f, g), ``val_gram`` (g, g) and ``sq`` (diag of f's) in ONE sweep of the vocabulary.

    Each block of ``G`` is computed once and feeds every requested product, so asking for several
    Grams costs about what one does. ``need`` holds any of those four names.
    """
    if g is not None and (g.vocab, g.hidden) != (f.vocab, f.hidden):
        raise ValueError(f"head shapes differ: {(f.vocab, f.hidden)} vs {(g.vocab, g.hidden)}")
    if g is None and need & {"cross", "val_gram"}:
        raise ValueError("cross / val_gram need the second batch g")
    with torch.inference_mode():
        out: dict[str, torch.Tensor] = {}
        if "gram" in need:
            out["gram"] = f.h.new_zeros(f.n, f.n)
        if "sq" in need:
            out["sq"] = f.h.new_zeros(f.n)
        if g is not None and "cross" in need:
            out["cross"] = f.h.new_zeros(f.n, g.n)
        if g is not None and "val_gram" in need:
            out["val_gram"] = f.h.new_zeros(g.n, g.n)
        wants_g = g is not None and bool(need & {"cross", "val_gram"})
        wants_f = bool(need & {"gram", "sq", "cross"})
        for v0, v1 in f.blocks(g if wants_g else None, max_bytes=max_bytes):
            a = f.grad_block(v0, v1) if wants_f else None
            b = g.grad_block(v0, v1).to(f.h.dtype) if wants_g and g is not None else None
            if "gram" in out:
                out["gram"].addmm_(a, a.T)
            elif "sq" in out:
                out["sq"] += a.square().sum(1)
            if "cross" in out:
                out["cross"].addmm_(a, b.T)
            if "val_gram" in out:
                out["val_gram"].addmm_(b, b.T)
        if "gram" in out and "sq" in out:
            out["sq"] = out["gram"].diagonal().clone()
    return {k: v.clone() for k, v in out.items()}


def head_sq_norms(f: HeadTokens, *, max_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Tensor[n]: ``||G_i||^2`` without the n x n Gram."""
    with torch.inference_mode():
        out = f.h.new_zeros(f.n)
        for v0, v1 in f.blocks(max_bytes=max_bytes):
            out += f.grad_block(v0, v1).square().sum(1)
    return out.clone()


def head_grads(f: HeadTokens, *, max_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Tensor[n, V*H]: the materialised gradients (row-major like ``lm_head.weight.flatten()``)."""
    with torch.inference_mode():
        out = f.h.new_empty(f.n, f.dim)
        for v0, v1 in f.blocks(max_bytes=max_bytes):
            out[:, v0 * f.hidden : v1 * f.hidden] = f.grad_block(v0, v1)
    return out.clone()


def head_project(f: HeadTokens, projector: Any, *, max_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Tensor[n, d]: ``vec(P_out^T G_i P_in)`` for a :class:`~mixsel.features.projection.KroneckerProjector`."""
    if projector.shape != (f.vocab, f.hidden):
        raise ValueError(f"projector shape {projector.shape} does not match the head {(f.vocab, f.hidden)}")
    with torch.inference_mode():
        pi = projector.p_in.matrix(f.h.dtype, f.h.device)
        if f.err_out is not None and f.projector is projector:
            a = f.err_out * f.scale.unsqueeze(-1)  # from the pass's own logits
        else:
            po = projector.p_out.matrix(f.h.dtype, f.h.device)
            a = f.h.new_zeros(f.n, f.h.shape[1], po.shape[1])  # err @ P_out, accumulated over blocks
            for v0, v1 in f.blocks(max_bytes=max_bytes):
                a += f.err_block(v0, v1) @ po[v0:v1]
        b = f.h @ pi  # [n, T', d_in]
        out = (a.transpose(1, 2) @ b).reshape(f.n, -1)
    return out.clone()
