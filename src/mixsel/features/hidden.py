"""Mean-pooled hidden states (CoLM clusters SuperGLUE examples into sources by them; ``hidden_fl``).

The pooled last hidden state of a pool comes from the same no-grad forward as the scalar signals:
``forward_stats(model, batch, hidden=True)["hidden"]`` (:mod:`mixsel.features.loss`).
"""

from __future__ import annotations

import torch

__all__ = ["mean_pool"]


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
