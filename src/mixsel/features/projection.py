"""Seeded random projections of per-example gradients, identical on every process.

* :class:`RandomProjector`: a dense ``[D, d]`` Rademacher or Gaussian matrix with entries of variance
  ``1/d`` (so ``E <x P, y P> = <x, y>``; Johnson-Lindenstrauss), generated block by block from a CPU
  ``torch.Generator`` seeded by ``(seed, block)`` - never from the global or a device RNG - so every
  rank, device and chunking sees the same matrix (TRAK / LESS style).
* :class:`KroneckerProjector`: the projection by ``P_out ⊗ P_in`` of a gradient that is a sum of
  rank-one terms, ``G = sum_t a_t b_t^T``:  ``P_out^T G P_in = sum_t (P_out^T a_t)(P_in^T b_t)^T``
  (LoGra-style). It never forms the ``P x Q`` gradient, costs ``T (P d_out + Q d_in + d_out d_in)`` per
  example and equals the dense projection of the flattened gradient by ``torch.kron(P_out, P_in)``;
  inner products are unbiased.
"""

from __future__ import annotations

import math

import torch

from mixsel.features.loss import GradFactors
from mixsel.seeding import projection_block_seed

__all__ = ["PROJECTION_KINDS", "KroneckerProjector", "RandomProjector", "kronecker_dims"]

PROJECTION_KINDS = ("rademacher", "gaussian")
_CACHE_LIMIT = 2**26  # cache dense matrices up to 64M entries by default


class RandomProjector:
    """Dense seeded random projection ``x -> x @ P`` with ``P`` of shape ``[in_dim, out_dim]``.

    Args:
        in_dim: feature dimension D.
        out_dim: projected dimension d.
        seed: the matrix depends only on (seed, kind, in_dim, out_dim, block_rows).
        kind: ``"rademacher"`` (entries ±1/sqrt(d)) or ``"gaussian"`` (N(0, 1/d)).
        block_rows: rows of ``P`` generated per seeded block (part of the matrix's identity; keep the
            default for reproducibility across runs).
        cache: keep the generated matrix (default: when it has at most 2^26 entries). Without cache the
            blocks are regenerated on every call, chunking over the input dimension.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        seed: int = 0,
        kind: str = "rademacher",
        block_rows: int = 4096,
        cache: bool | None = None,
    ) -> None:
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"in_dim and out_dim must be positive, got {in_dim} and {out_dim}")
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {PROJECTION_KINDS}")
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.in_dim, self.out_dim, self.seed, self.kind = in_dim, out_dim, seed, kind
        self.block_rows = block_rows
        self.cache = in_dim * out_dim <= _CACHE_LIMIT if cache is None else cache
        self._matrix: torch.Tensor | None = None

    def block(self, index: int) -> torch.Tensor:
        """Rows ``[index * block_rows, ...)`` of ``P`` as a float64 CPU tensor."""
        start = index * self.block_rows
        rows = min(self.block_rows, self.in_dim - start)
        if rows <= 0:
            raise IndexError(f"block {index} is past in_dim={self.in_dim}")
        g = torch.Generator().manual_seed(projection_block_seed(self.seed, index))
        scale = 1.0 / math.sqrt(self.out_dim)
        if self.kind == "rademacher":
            p = torch.randint(0, 2, (rows, self.out_dim), generator=g, dtype=torch.int8).to(torch.float64)
            return p.mul_(2).sub_(1).mul_(scale)
        return torch.randn(rows, self.out_dim, generator=g, dtype=torch.float64).mul_(scale)

    @property
    def num_blocks(self) -> int:
        return -(-self.in_dim // self.block_rows)

    def matrix(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole ``[in_dim, out_dim]`` matrix."""
        if self._matrix is not None:
            return self._matrix.to(dtype=dtype, device=device)
        m = torch.cat([self.block(i) for i in range(self.num_blocks)])
        if self.cache:
            self._matrix = m
        return m.to(dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` [..., in_dim] to [..., out_dim] (in ``x``'s dtype and device)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x has last dimension {x.shape[-1]}, the projector expects {self.in_dim}")
        if self.cache:
            return x @ self.matrix(x.dtype, x.device)
        out = x.new_zeros(*x.shape[:-1], self.out_dim)
        for i in range(self.num_blocks):
            s = i * self.block_rows
            blk = self.block(i).to(dtype=x.dtype, device=x.device)
            out += x[..., s : s + blk.shape[0]] @ blk
        return out


def kronecker_dims(dim: int, p: int, q: int) -> tuple[int, int]:
    """Split ``dim`` into ``d_out * d_in = dim`` with ``d_out <= p``, ``d_in <= q``, as square as possible.

    Raises:
        ValueError: when no exact factorisation fits (e.g. ``dim > p * q``).
    """
    if dim <= 0:
        raise ValueError(f"projection_dim must be positive, got {dim}")
    best = None
    for d_in in range(1, min(q, dim) + 1):
        if dim % d_in == 0 and dim // d_in <= p:
            score = abs(math.log(d_in) - math.log(dim // d_in))
            if best is None or score < best[0]:
                best = (score, d_in)
    if best is None:
        raise ValueError(
            f"projection_dim={dim} cannot be written as d_out*d_in with d_out<={p} and d_in<={q}; "
            f"choose a dimension with such a factorisation (at most {p * q})"
        )
    return dim // best[1], best[1]


class KroneckerProjector:
    """Projection of rank-one-factored gradients by ``P_out ⊗ P_in`` without forming them.

    Args:
        out_features: P, rows of the weight (vocabulary size for the LM head).
        in_features: Q, columns of the weight (hidden size for the LM head); include the bias column
            (``Q + 1``) when projecting factors with ``bias=True``.
        dim: projected dimension (``d_out * d_in``; see :func:`kronecker_dims`), or give ``dims``.
        dims: explicit ``(d_out, d_in)``.
        seed, kind: as :class:`RandomProjector`; the two factors use seeds derived from ``seed``.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        dim: int | None = None,
        *,
        dims: tuple[int, int] | None = None,
        seed: int = 0,
        kind: str = "rademacher",
    ) -> None:
        if dims is None:
            if dim is None:
                raise ValueError("pass dim (total projected dimension) or dims=(d_out, d_in)")
            dims = kronecker_dims(dim, out_features, in_features)
        self.dims = (int(dims[0]), int(dims[1]))
        self.shape = (out_features, in_features)
        self.p_out = RandomProjector(out_features, self.dims[0], seed=2 * seed, kind=kind)
        self.p_in = RandomProjector(in_features, self.dims[1], seed=2 * seed + 1, kind=kind)

    @property
    def dim(self) -> int:
        return self.dims[0] * self.dims[1]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The equivalent dense ``[P*Q, d]`` matrix ``kron(P_out, P_in)`` (for tests; large)."""
        return torch.kron(self.p_out.matrix(dtype), self.p_in.matrix(dtype))

    def project_factors(self, f: GradFactors, *, chunk: int = 64) -> torch.Tensor:
        """Tensor[n, d_out*d_in]: ``vec(P_out^T G_i P_in)`` for each example, chunked over examples."""
        inputs = f.inputs_with_bias()
        if (f.out_grads.shape[-1], inputs.shape[-1]) != self.shape:
            raise ValueError(
                f"factors of shape {(f.out_grads.shape[-1], inputs.shape[-1])} do not match the "
                f"projector's {self.shape}"
            )
        dtype, device = f.out_grads.dtype, f.out_grads.device
        po, pi = self.p_out.matrix(dtype, device), self.p_in.matrix(dtype, device)
        out = f.out_grads.new_empty(f.n, self.dim)
        for i0 in range(0, f.n, chunk):
            a = f.out_grads[i0 : i0 + chunk] @ po  # [c, T, d_out]
            b = inputs[i0 : i0 + chunk] @ pi  # [c, T, d_in]
            out[i0 : i0 + chunk] = (a.transpose(1, 2) @ b).reshape(a.shape[0], -1)
        return out

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """Project already materialised gradients [n, P*Q] (row-major), as ``vec(P_out^T G P_in)``."""
        p, q = self.shape
        g = grads.reshape(grads.shape[0], p, q)
        po, pi = self.p_out.matrix(grads.dtype, grads.device), self.p_in.matrix(grads.dtype, grads.device)
        return (po.T @ g @ pi).reshape(grads.shape[0], -1)
