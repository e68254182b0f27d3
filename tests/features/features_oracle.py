"""Independent oracle for the feature tests: torch.func per-sample gradients (functional_call + vmap)."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def oracle_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean target-token CE of ONE example (logits [T, V], labels [T]), written independently."""
    y = labels[1:]
    keep = (y != -100).to(logits.dtype)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def per_sample_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str], *, tie_weights: bool = True
) -> torch.Tensor:
    """Tensor[n, D]: vmap(grad) per-example gradients w.r.t. the parameters ``names``, concatenated."""
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names} if tie_weights else {}
    if not tie_weights:  # e.g. the LM-head *usage* of a tied matrix
        for k in names:
            module, attr = k.rsplit(".", 1)
            chosen[k] = getattr(model.get_submodule(module), attr).detach()

    def loss(p, ids, am, lab):
        out = functional_call(
            model,
            p,
            (),
            {"input_ids": ids[None], "attention_mask": am[None], "use_cache": False},
            tie_weights=tie_weights,
            strict=False,
        )
        return oracle_loss(out.logits[0], lab)

    g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(chosen, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return torch.cat([g[k].detach().reshape(g[k].shape[0], -1) for k in names], dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))
