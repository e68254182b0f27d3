"""Shared engine of the gradient-matching pursuits (OMP, PartitionSel's matroid pursuit).

All of them grow a support S greedily and refit weights on it by solving the small system

    min_w  ||G_S^T w - t||^2 + ridge * ||w||^2   (optionally w >= 0)

in Gram form: A = K_SS + ridge * I, b = mu_S, where K = G G^T and mu = G t. Equivalently they
maximise U(w) = <w, b> - 1/2 w^T A w. The refit keeps a Cholesky factor of A restricted to the
"passive" set P (the coordinates allowed to be non-zero) -- stored as its inverse L^{-1}, so a new
column costs two matrix-vector products, O(|P|^2), and each solve two more.

* Signed weights: P = S, so each step is one factor append and one solve.
* Non-negative weights: Lawson & Hanson's active-set NNLS on the support, warm-started from the
  previous solution (which already satisfies the KKT conditions on the old support, so usually a
  single append suffices). When a passive weight would turn negative the method steps back to
  the boundary, moves that coordinate out of P and re-appends the passive columns that followed it
(rows of L^{-1} before the removed one stay valid).
  The result is the exact NNLS solution on S (up to floating-point tolerance).

Everything on the k x k system runs in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SupportSolver"]

_PIVOT_RTOL = 1e-10


class SupportSolver:
    """Exact (NN)LS refits on a growing support; see the module docstring."""

    def __init__(self, capacity: int, *, ridge: float, nonnegative: bool, device: torch.device) -> None:
        f64 = torch.float64
        self.ridge = float(ridge)
        self.nonnegative = nonnegative
        self.A = torch.zeros(capacity, capacity, dtype=f64, device=device)
        self.b = torch.zeros(capacity, dtype=f64, device=device)
        self.w = torch.zeros(capacity, dtype=f64, device=device)
        self.Li = torch.zeros(capacity, capacity, dtype=f64, device=device)  # inverse Cholesky of A_PP
        self.pbuf = torch.zeros(capacity, dtype=torch.long, device=device)  # passive positions, Li order
        self.s = 0  # support size
        self.passive: list[int] = []  # support positions with free (non-zero) weights, in L order
        self.refactors = 0

    # ------------------------------------------------------------------ support bookkeeping
    def append(self, cross: torch.Tensor, kjj: float, bj: float) -> None:
        """Add a column with K[S, j] = ``cross``, K_jj = ``kjj`` and mu_j = ``bj``; weight 0."""
        s = self.s
        self.A[s, :s] = cross
        self.A[:s, s] = cross
        self.A[s, s] = kjj + self.ridge
        self.b[s] = bj
        self.w[s] = 0.0
        self.s = s + 1

    def pop(self) -> None:
        """Drop the last appended column (it must not be passive)."""
        self.s -= 1
        if self.s in self.passive:
            raise RuntimeError("cannot pop a passive column")

    def weights(self) -> torch.Tensor:
        return self.w[: self.s]

    def utility(self) -> float:
        """U(w) = <w, b> - 1/2 w^T A w at the current weights."""
        w, s = self.w[: self.s], self.s
        return float(w @ self.b[:s] - 0.5 * w @ (self.A[:s, :s] @ w))

    def residual_sqnorm(self, target_sqnorm: float) -> float:
        """||G_S^T w - t||^2 = ||t||^2 - 2 <w, b> + w^T (A - ridge I) w."""
        w, s = self.w[: self.s], self.s
        quad = float(w @ (self.A[:s, :s] @ w)) - self.ridge * float(w @ w)
        return max(0.0, target_sqnorm - 2.0 * float(w @ self.b[:s]) + quad)

    # ------------------------------------------------------------------ inverse Cholesky of A_PP
    def _pidx(self) -> torch.Tensor:
        return self.pbuf[: len(self.passive)]

    def _passive_append(self, pos: int) -> bool:
        """Extend the inverse factor Li = L^{-1} of A_PP by one row (two matrix-vector products)."""
        p = len(self.passive)
        ajj = float(self.A[pos, pos])
        if p:
            Li = self.Li[:p, :p]
            l = Li @ self.A[pos].index_select(0, self._pidx())  # new row of L: L l = A[P, pos]
            d2 = ajj - float(l @ l)
        else:
            d2 = ajj
        if not d2 > _PIVOT_RTOL * max(abs(ajj), 1e-300):
            return False  # (numerically) dependent on the passive columns
        delta = math.sqrt(d2)
        if p:
            self.Li[p, :p] = (Li.T @ l) / -delta
        self.Li[p, p] = 1.0 / delta
        self.pbuf[p] = pos
        self.passive.append(pos)
        return True

    def _truncate_passive(self, keep: list[int]) -> None:
        """Shrink P to ``keep`` (a sub-sequence): rows of Li before the first removal stay valid."""
        first = 0
        while first < len(keep) and keep[first] == self.passive[first]:
            first += 1
        rest = keep[first:]
        self.passive = self.passive[:first]
        self.refactors += 1
        for pos in rest:
            if not self._passive_append(pos):  # cannot happen in exact arithmetic (sub-block of a PD block)
                raise RuntimeError("NNLS refactorisation lost positive definiteness")

    def _solve_passive(self) -> torch.Tensor:
        p = len(self.passive)
        Li = self.Li[:p, :p]
        return Li.T @ (Li @ self.b.index_select(0, self._pidx()))

    # ------------------------------------------------------------------ refits
    def refit(self) -> bool:
        """Refit the weights after ``append``; return whether the new column became passive."""
        last = self.s - 1
        if not self.nonnegative:
            if not self._passive_append(last):
                return False
            self.w[: self.s].zero_()
            self.w[self._pidx()] = self._solve_passive()
            return True
        self._lawson_hanson()
        return last in self.passive

    def _lawson_hanson(self) -> None:
        s = self.s
        A, b, w = self.A[:s, :s], self.b[:s], self.w[:s]
        tol = 1e-12 * max(1.0, float(b.abs().max())) if s else 0.0
        blocked: set[int] = set()
        for _ in range(3 * s + 10):
            grad = b - A @ w
            mask = torch.zeros(s, dtype=torch.bool, device=A.device)
            out = self.passive + list(blocked)
            if out:
                mask[torch.tensor(out, dtype=torch.long, device=A.device)] = True
            grad = grad.masked_fill(mask, -math.inf)
            i = int(torch.argmax(grad))
            if not float(grad[i]) > tol:
                return
            if not self._passive_append(i):
                blocked.add(i)
                continue
            for _ in range(3 * s + 10):
                idx = self._pidx().clone()
                z = self._solve_passive()
                if bool((z > 0).all()):
                    w[idx] = z
                    break
                wp = w[idx]
                neg = z <= 0
                denom = wp[neg] - z[neg]
                ratio = torch.where(denom > 0, wp[neg] / denom.clamp_min(1e-300), torch.zeros_like(denom))
                alpha = float(ratio.min())
                new = wp + alpha * (z - wp)
                # leave P: the coordinate(s) that hit the boundary (at least the arg-min one)
                hit = neg.clone()
                hit[neg] = ratio <= alpha * (1 + 1e-12)
                hit |= new <= 0
                new[hit] = 0.0
                w[idx] = new
                keep = [pos for pos, h in zip(self.passive, hit.tolist()) if not h]
                if i not in keep and len(keep) == len(self.passive) - 1 and alpha == 0.0:
                    blocked.add(i)  # numerically stuck: the entering column cannot move
                self._truncate_passive(keep)
