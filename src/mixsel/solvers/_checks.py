"""Input validation shared by the solvers: clear ``ValueError`` messages naming the bad argument."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "check_finite",
    "check_gram",
    "check_k",
    "check_matrix",
    "check_partition",
    "host_matrix",
]

_GRAM_RTOL = 1e-2  # asymmetry or Cauchy-Schwarz excess, relative to sqrt(|K_ii K_jj|), called "clearly wrong"
_DIAGONAL_RTOL = 1e-4  # a diagonal entry below -1e-4 * max |diagonal| is not a squared norm
_CHECKED_ROWS = 8  # rows of a Gram checked against their columns (the first picks)


def check_k(k: int, n: int) -> int:
    """Return ``k`` as an int after checking ``0 < k <= n``.

    Python ints, numpy integer scalars and integer 0-d tensors are accepted; bools and floats
    (even whole ones such as 4.0) are refused, so a fraction never silently becomes a count.
    """
    if isinstance(k, (bool, np.bool_)) or (isinstance(k, torch.Tensor) and k.dtype == torch.bool):
        raise ValueError(f"k must be a positive integer, got the bool {k!r}; pass the number of examples to pick.")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(
            f"k must be a positive integer, got {type(k).__name__} {k}; pass a whole number as an int, e.g. int(k)."
        ) from None
    if k <= 0:
        raise ValueError(f"k must be positive, got k={k}; ask for at least one example.")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of candidates n={n}; use k <= n.")
    return k


def _all_finite(x: torch.Tensor) -> bool:
    # numpy on the CPU: one cheap pass (torch.isfinite(x).all() was ~30x slower on a busy CPU)
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or inf, naming the first offending rows."""
    if not _all_finite(x):
        bad = ~torch.isfinite(x)
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).reshape(-1) if x.dim() else bad
        raise ValueError(
            f"{name} contains NaN or inf (rows {rows[:8].tolist()}); drop or repair those examples before selecting."
        )


def host_matrix(x: torch.Tensor, name: str, *, square: bool = False) -> np.ndarray:
    """``x`` as a 2-D float32/float64 numpy array on the host, after type and shape checks.

    A view for CPU float32/float64 tensors (no copy); other floating dtypes become float32,
    integers the default dtype; a CUDA tensor is copied to the host. Finiteness is not checked.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if square and x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square [n, n], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32 if x.is_floating_point() else torch.get_default_dtype())
    return x.detach().cpu().numpy()


def check_matrix(x: torch.Tensor, name: str, *, square: bool = False, rows: int | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating 2-D tensor (optionally square / with ``rows`` rows), finite."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if square and x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square [n, n], got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows but {rows} were expected")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    check_finite(x, name)
    return x


def check_partition(
    groups: torch.Tensor | Sequence[int] | None,
    budgets: torch.Tensor | Sequence[int] | None,
    n: int,
    k: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate a partition-matroid constraint ``|S ∩ group g| <= budgets[g]``.

    Args:
        groups: LongTensor[n] of group ids in ``[0, G)``, or None.
        budgets: per-group maximum counts (length G), or None (no constraint).
        n: number of candidates.
        k: number of picks requested.

    Returns:
        ``(groups, budgets)`` as LongTensors (or None), budgets clipped to the group sizes.

    Raises:
        ValueError: budgets without groups, wrong lengths, negative values, group ids outside
            ``[0, len(budgets))``, or capacity ``sum_g min(budgets[g], n_g) < k``.
    """
    if groups is None:
        if budgets is not None:
            raise ValueError("budgets were given without groups; pass groups=LongTensor[n] of group ids.")
        return None, None
    groups = torch.as_tensor(groups)
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer group ids, got dtype {groups.dtype}")
    groups = groups.to(torch.long).reshape(-1)
    if groups.numel() != n:
        raise ValueError(f"groups has {groups.numel()} entries but there are n={n} candidates")
    if n and int(groups.min()) < 0:
        raise ValueError(f"groups must be non-negative ids, got min {int(groups.min())}")
    if budgets is None:
        return groups, None
    budgets = torch.as_tensor(budgets)
    if budgets.dtype.is_floating_point and not torch.equal(budgets, budgets.round()):
        raise ValueError(f"budgets must be whole numbers, got {budgets.tolist()}")
    budgets = budgets.to(torch.long).reshape(-1)
    num_groups = budgets.numel()
    if n and int(groups.max()) >= num_groups:
        raise ValueError(
            f"groups holds id {int(groups.max())} but budgets has only {num_groups} entries; "
            "give one budget per group id 0..G-1."
        )
    if (budgets < 0).any():
        raise ValueError(f"budgets must be non-negative, got {budgets.tolist()}")
    sizes = torch.bincount(groups, minlength=num_groups)
    capacity = int(torch.minimum(budgets, sizes).sum())
    if capacity < k:
        raise ValueError(
            f"budgets allow only {capacity} picks (sum of min(budget, group size)) but k={k}; "
            "raise the budgets or lower k."
        )
    return groups, torch.minimum(budgets, sizes)


def check_gram(gram: np.ndarray, rows: np.ndarray | Sequence[int], name: str = "gram") -> None:
    """Raise unless ``gram`` looks like a Gram matrix K = G G^T on the rows a solver used.

    The greedy solvers read K only on the rows (and columns) of the candidates they pick, so
    after their loop they pass the first ``_CHECKED_ROWS`` picks as ``rows`` and this O(n)
    check, with no eigendecomposition, tests:

    * the whole diagonal: no entry below -1e-4 times the largest |K_ii| (a Gram's diagonal
      holds squared norms ||g_i||^2 >= 0);
    * symmetry of the checked rows against their columns: |K_ij - K_ji| <= 1% of
      max(sqrt(|K_ii K_jj|), |K_ij|) (round-off passes; a random, cross or transposed product
      fails);
    * positive semi-definiteness through the 2x2 principal minors of those rows
      (Cauchy-Schwarz): |K_ij| <= sqrt(K_ii K_jj) up to the same 1% (a similarity or distance
      matrix, a Gram with its diagonal dropped, -K fail).

    A matrix that is wrong only away from the checked rows, or whose negative eigenvalues leave
    every 2x2 minor there non-negative, passes: these checks catch wrong inputs, they do not
    certify a Gram matrix. Finiteness is checked separately (``check_finite``).

    Args:
        gram: [n, n] float32/float64 host array (``host_matrix``), finite.
        rows: the row indices to check (in pick order; only the first ``_CHECKED_ROWS`` count).
        name: argument name for the messages.

    Raises:
        ValueError: one line naming ``name``, the offending entry and the fix.
    """
    diag = gram.diagonal()
    if diag.shape[0] == 0:
        return
    dmin, dmax = float(diag.min()), float(diag.max())
    if dmin < -_DIAGONAL_RTOL * max(abs(dmin), abs(dmax)):
        i = int(diag.argmin())
        raise ValueError(
            f"{name}[{i}, {i}] = {dmin:.4g} < 0, but the diagonal of a Gram matrix holds squared norms "
            f"<g_i, g_i> >= 0; pass the Gram matrix G @ G.T of the features."
        )
    rows = np.asarray(rows, dtype=np.int64)[:_CHECKED_ROWS]
    if rows.shape[0] == 0:
        return
    root = np.sqrt(np.abs(diag))
    bound = np.multiply.outer(root[rows], root)  # sqrt(|K_ii K_jj|) for i in rows
    block = gram[rows]
    size = np.abs(block)
    asymmetry = np.abs(block - gram[:, rows].T) - _GRAM_RTOL * np.maximum(bound, size)
    excess = size - (1.0 + _GRAM_RTOL) * bound  # Cauchy-Schwarz
    floor = 64 * float(np.finfo(gram.dtype).eps) * max(abs(dmin), abs(dmax))  # round-off of an entry
    if float(np.maximum(asymmetry, excess).max()) <= floor:
        return
    if float(asymmetry.max()) > floor:
        a, j = np.unravel_index(int(asymmetry.argmax()), asymmetry.shape)
        i = int(rows[a])
        raise ValueError(
            f"{name} is not symmetric: {name}[{i}, {j}] = {gram[i, j]:.4g} but {name}[{j}, {i}] = {gram[j, i]:.4g}; "
            f"pass the Gram matrix G @ G.T (or (K + K.T) / 2 if the asymmetry is round-off)."
        )
    a, j = np.unravel_index(int(excess.argmax()), excess.shape)
    i = int(rows[a])
    raise ValueError(
        f"{name} is not positive semi-definite: |{name}[{i}, {j}]| = {abs(gram[i, j]):.4g} > "
        f"sqrt({name}[{i}, {i}] * {name}[{j}, {j}]) = {bound[a, j]:.4g}; pass the Gram matrix G @ G.T of "
        f"the features, not a similarity or distance matrix."
    )
