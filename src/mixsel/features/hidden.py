"""Mean-pooled last hidden states (CoLM clusters SuperGLUE examples into sources by them; ``hidden_fl``)."""

from __future__ import annotations

import torch

__all__ = ["mean_pool", "pooled_hidden"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` [n, T, H] over attended tokens (all tokens when ``attention_mask`` is None).

    An example without attended tokens gets a zero vector.
    """
    if attention_mask is None:
        return hidden.mean(1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match hidden {tuple(hidden.shape[:2])}"
        )
    w = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


def pooled_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tensor[n, H]: the LM head's input (last hidden state after the final norm), mean-pooled over
    attended tokens, from one no-grad forward (see :func:`mixsel.features.loss.forward_stats`)."""
    from mixsel.features.loss import forward_stats

    return forward_stats(model, batch, hidden=True)["hidden"]
