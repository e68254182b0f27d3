"""Per-example gradient features captured inside a training step's own forward and backward.

The training step already computes, for every trained row, the gradient of its loss w.r.t. each
linear layer's output (the backward) and the layer's input (the forward). The per-example gradient of
that layer's weight is ``G_i = sum_t a_it b_it^T`` (``a`` = output gradient, ``b`` = input), so a
:class:`GradientCapture` around the step collects the same features :func:`pool_gradient_features`
would compute in a separate pass (``need=("grads",)``, Kronecker-projected with the same seeded
projectors, or exact when the projection is not smaller) without that pass:

* forward hooks keep each chosen layer's input and hook its output's gradient;
* a hook on the per-example losses (:meth:`GradientCapture.watch`) receives
  ``d(total loss) / d(loss_i)`` - the row's weight in the step's loss, whatever the loop multiplied
  it by (selection and domain weights, normalisation, world size, gradient accumulation, loss
  scaling) - and the output gradients are divided by it, giving each example's own gradient;
* the output gradients arrive after that hook (they lie upstream of the losses), are projected at
  once and dropped; nothing of size ``T x P`` outlives the micro-batch.

Rows whose weight is zero have no gradient in the step; :meth:`GradientCapture.features` reports
them as missing (the caller computes those few in a separate pass). The features equal the separate
pass's on the same rows and weights up to float rounding when the model has no dropout (train and
eval mode then agree); with dropout they are the gradients the step actually took.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mixsel import seeding
from mixsel.features.grads import resolve_modules
from mixsel.features.projection import KroneckerProjector

__all__ = ["GradientCapture"]


class GradientCapture:
    """Context manager collecting per-example (projected) gradients of ``modules`` during a train step.

    Args:
        model: the model being trained.
        modules: names of the ``nn.Linear`` layers (the LM head, or the layers of
            ``selection.features``), in the order of :func:`pool_gradient_features`.
        projection_dim: total projected dimension, split evenly over the modules (as
            ``pool_gradient_features``); a module with no more coordinates than its share is kept exact.
        seed: projection seed (``seeding.projection_seed(seed, k)`` for module ``k``).
        bias: include each module's bias gradient when it has one (the LM-head features never do).

    Usage::

        with GradientCapture(model, ["lm_head"], projection_dim=512, seed=0) as cap:
            for rows in micro_batches:
                per_example = per_example_loss(model(...).logits, labels)
                cap.watch(per_example)
                (per_example * w).sum().backward()
        feats, missing = cap.features()   # Tensor[k, d], BoolTensor[k]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: Sequence[str | torch.nn.Module],
        *,
        projection_dim: int | None,
        seed: int,
        bias: bool = True,
    ) -> None:
        self.targets = resolve_modules(model, list(modules))
        per = max(1, (projection_dim or 0) // len(self.targets)) if projection_dim else None
        self.bias = [bias and mod.bias is not None for _, mod in self.targets]
        self.projectors: list[KroneckerProjector | None] = []
        for k, (_, mod) in enumerate(self.targets):
            p, q = mod.out_features, mod.in_features + int(self.bias[k])
            exact = per is None or per >= p * q
            proj = None if exact else KroneckerProjector(p, q, per, seed=seeding.projection_seed(seed, k))  # type: ignore[arg-type]
            self.projectors.append(proj)
        self._parts: list[list[torch.Tensor]] = [[] for _ in self.targets]
        self._factors: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self.seconds = 0.0  # spent projecting the captured gradients (the capture's own cost)

    # ---- hooks ----------------------------------------------------------------------------------

    def __enter__(self) -> GradientCapture:
        for k, (_, mod) in enumerate(self.targets):
            self._handles.append(mod.register_forward_hook(self._forward_hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def watch(self, per_example: torch.Tensor) -> None:
        """Record ``d(total loss) / d(per_example)`` of this micro-batch (call before its backward)."""
        if not per_example.requires_grad:
            raise ValueError("per_example losses do not require grad: call watch() inside the training forward")
        per_example.register_hook(self._factor_hook)

    def _factor_hook(self, grad: torch.Tensor) -> None:
        self._factors.append(grad.detach())

    def _forward_hook(self, k: int) -> Any:
        def hook(_m: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
                return
            x = args[0].detach()
            out.register_hook(lambda g: self._on_grad(k, x, g))

        return hook

    def _on_grad(self, k: int, x: torch.Tensor, g: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self._project(k, x, g)
        self.seconds += time.perf_counter() - t0

    def _project(self, k: int, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self._factors:
            raise RuntimeError("GradientCapture: call watch(per_example_losses) before the backward")
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        factor = self._factors[-1].to(device=g.device, dtype=dtype)
        safe = torch.where(factor != 0, factor, torch.ones_like(factor))
        shape = (-1, *([1] * (g.dim() - 1)))
        a = g.detach().to(dtype) / safe.view(shape) * (factor != 0).to(dtype).view(shape)
        b = x.to(dtype)
        if a.dim() == 2:  # [mb, P] without a time axis
            a, b = a.unsqueeze(1), b.unsqueeze(1)
        if self.bias[k]:
            b = torch.cat([b, torch.ones_like(b[..., :1])], dim=-1)
        proj = self.projectors[k]
        with torch.no_grad():
            if proj is not None:
                po = proj.p_out.matrix(a.dtype, a.device)
                pi = proj.p_in.matrix(a.dtype, a.device)
                feats = ((a @ po).transpose(1, 2) @ (b @ pi)).reshape(a.shape[0], -1)
            else:
                full = a.transpose(1, 2) @ b  # [mb, P, Q(+1)]
                q = full.shape[-1] - int(self.bias[k])
                feats = full[:, :, :q].reshape(a.shape[0], -1)
                if self.bias[k]:
                    feats = torch.cat([feats, full[:, :, q]], dim=1)
        self._parts[k].append(feats.cpu())

    # ---- result ---------------------------------------------------------------------------------

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Tensor[k, d], BoolTensor[k])``: every watched row's features and which rows are missing.

        Rows appear in the order of the micro-batches; a row is missing when its weight in the loss
        was zero (its features are zeros). Modules are concatenated in the order given.
        """
        if not self._factors:
            raise RuntimeError("GradientCapture saw no micro-batch: call watch() on each micro-batch's losses")
        counts = [len(p) for p in self._parts]
        if len(set(counts)) != 1 or counts[0] != len(self._factors):
            raise RuntimeError(
                f"GradientCapture: {len(self._factors)} micro-batches watched but module gradients arrived "
                f"{counts} times; every watched loss must be backpropagated through every module once"
            )
        feats = torch.cat([torch.cat(parts) for parts in self._parts], dim=1)
        missing = torch.cat(self._factors).cpu() == 0
        return feats, missing
