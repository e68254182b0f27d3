"""Diagnostics of a selected batch: gradient conflicts, gradient variance, domain composition."""

from __future__ import annotations

import torch

__all__ = ["conflicting_pairs", "gradient_mismatch"]


def conflicting_pairs(gram: torch.Tensor, indices: torch.Tensor | None = None) -> int:
    """Number of unordered pairs i < j with a negative gradient inner product.

    This is PartitionSel's "conflicting gradient pairs" count (arXiv 2606.07954, Fig. 3), taken on the
    Gram matrix of the selection features.

    Args:
        gram: Tensor[n, n] inner products of per-example gradient features.
        indices: optional subset (e.g. the selected examples); default all rows.
    """
    if indices is not None:
        gram = gram[indices][:, indices]
    if gram.numel() == 0:
        return 0
    upper = torch.triu(torch.ones_like(gram, dtype=torch.bool), diagonal=1)
    return int(((gram < 0) & upper).sum())


def gradient_mismatch(gram: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Relative squared error of the selected batch's mean gradient against the pool's mean gradient.

    ||sum_i w_i g_i / sum w - mean_j g_j||^2 / ||mean_j g_j||^2 computed from the Gram matrix only
    (no gradients materialised): the "variance of the selected-batch gradient against the large
    batch" diagnostic (CoLM Sec. 4; GradMatch).
    """
    n = gram.shape[0]
    gram = gram.to(torch.float64)
    w = torch.zeros(n, dtype=torch.float64)
    sel_w = torch.ones(len(indices), dtype=torch.float64) if weights is None else weights.to(torch.float64)
    w[indices] = sel_w / sel_w.sum().clamp_min(1e-30)
    u = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diff = w - u
    err = float(diff @ gram @ diff)
    ref = float(u @ gram @ u)
    return err / ref if ref > 0 else float("nan")
