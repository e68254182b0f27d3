"""``dograph``: domain weights from a graph-constrained optimisation over gradient statistics.

Seed paper: Xu et al., "Rethinking Data Mixing from the Perspective of Large Language Models"
(arXiv 2604.07963, DoGraph). The public text states that (i) domains are characterised by their
gradient dynamics, and (ii) DoGraph "formulates data scheduling as a graph-constrained optimization
problem" solved during training. The method section is not publicly readable, so the concrete
problem below is **our reading** (see ``docs/reweighting.md`` for what is from the paper and what
is our choice). At each update t:

1. EMA of domain-mean gradient features (domains absent from the window keep their EMA)::

       ḡ_d ← β ḡ_d + (1 - β) g_d,   g_d = grad_sum_d / count_d;   v̄ ← β v̄ + (1 - β) v

   where v is the validation gradient (the mean of the rows when per-domain validation gradients
   are given). The first observation initialises the EMA (no bias toward zero).
2. Domain graph: S_ij = cos(ḡ_i, ḡ_j); A_ij = S_ij if S_ij > threshold (and j among the ``knn``
   most similar domains of i, or i among those of j), else 0; A_ii = 0. Laplacian L = diag(A 1) - A.
3. Alignment with validation: a_d = cos(ḡ_d, v̄) (or a norm-scaled inner product, ``alignment="dot"``).
4. Weights: the solution of::

       min_{w ∈ Δ}  F(w) = -η ⟨a, w⟩ + (γ / 2) wᵀ L w + τ KL(w ‖ w_{t-1})

   by ``inner_iters`` steps of mirror descent with the entropy mirror map (exponentiated gradient)
   started at w_{t-1}: w ← normalise(w ⊙ exp(-s ∇F(w))), ∇F = -η a + γ L w + τ (log(w / w_{t-1}) + 1).
   F is (τ + γ max_i deg_i)-smooth relative to the entropy (Pinsker), so the default inner step
   s = 1 / (τ + γ max_i deg_i) decreases F monotonically (Lu, Freund & Nesterov 2018).
5. Smoothing toward uniform, w_t = (1 - ε) w + ε / D, so no domain is ever starved.

With γ = 0 the problem has the closed form w_t ∝ w_{t-1} ⊙ exp(η a / τ): an exponentiated-gradient
step on gradient alignment, as in DoGE (Fan et al., 2024). The Laplacian term is what makes it
"graph-constrained": domains with similar gradients are pulled toward similar weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch

from mixsel.errors import ConfigError
from mixsel.registry import register_reweighter
from mixsel.reweighting.base import Mode
from mixsel.reweighting.common import ScheduledReweighter
from mixsel.reweighting.simplex import DTYPE, as_domain_vector, exponentiated_step, normalize, smooth
from mixsel.types import DomainStats

__all__ = [
    "DoGraphReweighter",
    "alignment_scores",
    "cosine_similarity",
    "dograph_objective",
    "domain_graph",
    "graph_laplacian",
    "mirror_descent",
]

Alignment = Literal["cosine", "dot"]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))


def cosine_similarity(grads: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor[D, D] cosine similarity of the rows of ``grads``; 0 for zero or invalid rows.

    Args:
        grads: Tensor[D, d] domain gradient features.
        valid: optional BoolTensor[D]; rows marked False get zero similarity to everything.
    """
    g = grads.to(DTYPE)
    # Rescale by the largest entry first so that huge features do not overflow the norm.
    scale = g.abs().max().clamp_min(1e-300)
    u = _unit_rows(g / scale)
    if valid is not None:
        u = u * valid.to(DTYPE).unsqueeze(-1)
    return (u @ u.T).clamp(-1.0, 1.0)


def domain_graph(similarity: torch.Tensor, *, threshold: float = 0.0, knn: int | None = None) -> torch.Tensor:
    """Symmetric non-negative adjacency A[D, D] from a similarity matrix.

    A_ij = S_ij when S_ij > ``threshold`` and (with ``knn``) j is among the ``knn`` most similar
    other domains of i or i among those of j; otherwise 0. The diagonal is 0.

    Args:
        similarity: Tensor[D, D] symmetric similarities (e.g. cosine).
        threshold: minimum similarity for an edge; must be >= 0 so that edge weights are non-negative.
        knn: keep at most this many strongest neighbours per domain (union, then symmetric); None = all.
    """
    if threshold < 0:
        raise ConfigError(f"threshold={threshold} must be >= 0 (Laplacian edge weights are non-negative).")
    s = similarity.to(DTYPE).clone()
    num = s.shape[0]
    s.fill_diagonal_(0.0)
    adj = torch.where(s > threshold, s, torch.zeros_like(s))
    if knn is not None:
        if knn < 1:
            raise ConfigError(f"knn={knn} must be a positive integer or None (all neighbours).")
        k = min(knn, max(num - 1, 0))
        keep = torch.zeros_like(adj, dtype=torch.bool)
        if k > 0:
            masked = adj.clone()
            masked.fill_diagonal_(float("-inf"))
            # A stable sort breaks ties between equal similarities by domain id (deterministic).
            order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
            keep.scatter_(1, order, True)
        keep = keep | keep.T
        adj = torch.where(keep, adj, torch.zeros_like(adj))
    return adj


def graph_laplacian(adjacency: torch.Tensor) -> torch.Tensor:
    """Combinatorial Laplacian ``L = diag(A 1) - A`` (so ``wᵀ L w = ½ Σ_ij A_ij (w_i - w_j)²``)."""
    a = adjacency.to(DTYPE)
    return torch.diag(a.sum(dim=1)) - a


def alignment_scores(
    grads: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: Alignment = "cosine"
) -> torch.Tensor:
    """Tensor[D] alignment a_d of each domain's gradient with the validation gradient ``target``.

    ``"cosine"``: cos(ḡ_d, v). ``"dot"``: ⟨ḡ_d, v⟩ / (‖v‖ · mean_valid ‖ḡ_d‖), an inner product
    that keeps the relative gradient norms of the domains but is invariant to the global scale.
    Invalid (never observed) domains score 0.
    """
    g = grads.to(DTYPE)
    v = target.to(DTYPE)
    scale = torch.maximum(g.abs().max(), v.abs().max()).clamp_min(1e-300)
    g, v = g / scale, v / scale
    vnorm = v.norm()
    if not vnorm > 0:
        return torch.zeros(g.shape[0], dtype=DTYPE)
    if kind == "cosine":
        scores = _unit_rows(g) @ (v / vnorm)
    elif kind == "dot":
        norms = g.norm(dim=1)
        mean_norm = norms[valid].mean() if bool(valid.any()) else torch.tensor(0.0, dtype=DTYPE)
        if not mean_norm > 0:
            return torch.zeros(g.shape[0], dtype=DTYPE)
        scores = (g @ v) / (vnorm * mean_norm)
    else:
        raise ConfigError(f"alignment={kind!r} must be 'cosine' or 'dot'.")
    return torch.where(valid, scores, torch.zeros_like(scores))


def _kl(w: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    pos = w > 0
    ratio = torch.where(pos, w / torch.where(pos, prev, torch.ones_like(prev)), torch.ones_like(w))
    return torch.where(pos, w * torch.log(ratio), torch.zeros_like(w)).sum()


def dograph_objective(
    weights: torch.Tensor,
    *,
    align: torch.Tensor,
    laplacian: torch.Tensor,
    prev: torch.Tensor,
    step_size: float,
    laplacian_strength: float,
    kl: float,
) -> float:
    """F(w) = -η ⟨a, w⟩ + (γ/2) wᵀ L w + τ KL(w ‖ w_prev) (the DoGraph inner problem, our reading)."""
    w = weights.to(DTYPE)
    value = (
        -step_size * torch.dot(align.to(DTYPE), w)
        + 0.5 * laplacian_strength * (w @ laplacian.to(DTYPE) @ w)
        + kl * _kl(w, prev.to(DTYPE))
    )
    return float(value)


def mirror_descent(
    *,
    align: torch.Tensor,
    laplacian: torch.Tensor,
    prev: torch.Tensor,
    step_size: float,
    laplacian_strength: float,
    kl: float,
    iters: int,
    lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise :func:`dograph_objective` over the simplex by entropic mirror descent from ``prev``.

    Args:
        align: Tensor[D] alignment scores a.
        laplacian: Tensor[D, D] graph Laplacian L.
        prev: Tensor[D] previous weights (start point and KL anchor), on the simplex.
        step_size: η, the weight of the alignment reward.
        laplacian_strength: γ >= 0.
        kl: τ > 0, the KL (trust-region) strength.
        iters: number of mirror-descent iterations.
        lr: inner step s; default ``1 / (τ + γ max_i L_ii)``, the inverse relative-smoothness
            constant, for which every iteration does not increase F.

    Returns:
        (Tensor[D] final weights, Tensor[iters + 1] objective values, the first at ``prev``).
    """
    if not kl > 0:
        raise ConfigError(f"kl={kl} must be > 0 (the KL term keeps each update a bounded move).")
    if laplacian_strength < 0:
        raise ConfigError(f"laplacian_strength={laplacian_strength} must be >= 0.")
    if iters < 0:
        raise ConfigError(f"inner_iters={iters} must be >= 0.")
    a = align.to(DTYPE)
    lap = laplacian.to(DTYPE)
    p = prev.to(DTYPE)
    max_degree = float(torch.diagonal(lap).max()) if lap.numel() else 0.0
    if lr is None:
        lr = 1.0 / (kl + laplacian_strength * max_degree)
    if not lr > 0:
        raise ConfigError(f"inner_lr={lr} must be > 0.")
    kwargs = {"align": a, "laplacian": lap, "prev": p, "step_size": step_size}
    kwargs |= {"laplacian_strength": laplacian_strength, "kl": kl}
    w = p.clone()
    objectives = [dograph_objective(w, **kwargs)]
    for _ in range(iters):
        pos = w > 0
        ratio = torch.where(pos, w / p, torch.ones_like(w))
        log_ratio = torch.where(pos, torch.log(ratio), torch.zeros_like(w))
        grad = -step_size * a + laplacian_strength * (lap @ w) + kl * log_ratio
        w = exponentiated_step(w, -lr * grad)
        objectives.append(dograph_objective(w, **kwargs))
    return w, torch.tensor(objectives, dtype=DTYPE)


@register_reweighter("dograph")
class DoGraphReweighter(ScheduledReweighter):
    """DoGraph domain weights (graph-regularised gradient alignment; our reading, see module doc).

    Needs ``stats.grad`` (Tensor[D, d] summed per-example gradient features per domain) and
    ``stats.val_grad`` (Tensor[d], or Tensor[D, d] per-domain validation gradients, averaged) at
    least at the first update; later updates without ``val_grad`` reuse its EMA.

    Args:
        domains: domain names in id order.
        step_size: η, weight of the alignment reward (with γ = 0: w ∝ w_prev exp(η a / τ)).
        laplacian_strength: γ, strength of the graph smoothness term (γ/2) wᵀ L w.
        kl: τ, strength of KL(w ‖ w_prev); only the ratios η : γ : τ matter.
        ema: β of the gradient EMA, in [0, 1); 0 = use only the current window.
        inner_iters: mirror-descent iterations per update.
        inner_lr: mirror-descent step; default the monotone-descent step ``1 / (τ + γ max deg)``.
        knn: keep each domain's ``knn`` strongest edges (None = all edges above ``threshold``).
        threshold: minimum cosine similarity for an edge (>= 0).
        alignment: ``"cosine"`` (default) or ``"dot"`` (norm-scaled inner product).
        smoothing: ε of the final mix with uniform.
        initial_weights: w_0 as a list / ``{domain: w}`` dict (normalised); default uniform.
        mode: where the weights act; default ``"sampling"`` (data scheduling).
        update_every: the rule runs once every this many ``update`` calls on the summed window.
    """

    default_mode: Mode = "sampling"
    #: The training loop must fill ``DomainStats.grad`` and ``DomainStats.val_grad``.
    needs_grad: ClassVar[bool] = True

    def __init__(
        self,
        domains: list[str],
        *,
        step_size: float = 1.0,
        laplacian_strength: float = 1.0,
        kl: float = 1.0,
        ema: float = 0.9,
        inner_iters: int = 20,
        inner_lr: float | None = None,
        knn: int | None = None,
        threshold: float = 0.0,
        alignment: Alignment = "cosine",
        smoothing: float = 1e-3,
        initial_weights: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None,
        mode: Mode | None = None,
        update_every: int = 1,
    ) -> None:
        super().__init__(domains, mode=mode, update_every=update_every)
        checks = [
            (step_size >= 0 and step_size < float("inf"), f"step_size={step_size} must be finite and >= 0"),
            (laplacian_strength >= 0, f"laplacian_strength={laplacian_strength} must be >= 0"),
            (kl > 0 and kl < float("inf"), f"kl={kl} must be finite and > 0"),
            (0.0 <= ema < 1.0, f"ema={ema} must lie in [0, 1)"),
            (isinstance(inner_iters, int) and inner_iters >= 1, f"inner_iters={inner_iters} must be >= 1"),
            (inner_lr is None or inner_lr > 0, f"inner_lr={inner_lr} must be > 0 or None (auto)"),
            (knn is None or knn >= 1, f"knn={knn} must be >= 1 or None"),
            (threshold >= 0, f"threshold={threshold} must be >= 0"),
            (alignment in ("cosine", "dot"), f"alignment={alignment!r} must be 'cosine' or 'dot'"),
            (0.0 <= smoothing <= 1.0, f"smoothing={smoothing} must lie in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"dograph: {msg}.")
        self.step_size = float(step_size)
        self.laplacian_strength = float(laplacian_strength)
        self.kl = float(kl)
        self.ema = float(ema)
        self.inner_iters = inner_iters
        self.inner_lr = inner_lr
        self.knn = knn
        self.threshold = float(threshold)
        self.alignment: Alignment = alignment
        self.smoothing = float(smoothing)
        if initial_weights is not None:
            self._weights = normalize(
                as_domain_vector(initial_weights, self.domains, "initial_weights"), "initial_weights"
            )
        self._grad_ema: torch.Tensor | None = None
        self._val_ema: torch.Tensor | None = None
        self._seen = torch.zeros(self.num_domains, dtype=torch.bool)
        self._align = torch.zeros(self.num_domains, dtype=DTYPE)
        self._adjacency = torch.zeros(self.num_domains, self.num_domains, dtype=DTYPE)
        self.last_objectives: torch.Tensor = torch.zeros(0, dtype=DTYPE)

    @property
    def adjacency(self) -> torch.Tensor:
        """Tensor[D, D] the domain graph of the last update."""
        return self._adjacency.clone()

    @property
    def alignment_scores(self) -> torch.Tensor:
        """Tensor[D] the alignment scores a of the last update."""
        return self._align.clone()

    def _update_ema(self, stats: DomainStats) -> None:
        if stats.grad is None:
            raise ValueError(
                "dograph needs DomainStats.grad (Tensor[D, d] summed per-example gradient features per "
                "domain); compute gradient features (mixsel.features) and sum them per domain."
            )
        grad = stats.grad.to(DTYPE).reshape(self.num_domains, -1)
        present = stats.counts > 0
        mean = grad / stats.counts.to(DTYPE).clamp_min(1e-300).unsqueeze(-1)
        mean = torch.nan_to_num(mean, posinf=1e300, neginf=-1e300)
        if self._grad_ema is None:
            self._grad_ema = torch.zeros_like(mean)
        elif self._grad_ema.shape != mean.shape:
            raise ValueError(
                f"dograph: DomainStats.grad has shape {tuple(mean.shape)} but earlier updates had "
                f"{tuple(self._grad_ema.shape)}; keep the gradient feature dimension fixed during a run."
            )
        first = present & ~self._seen
        again = present & self._seen
        ema = self._grad_ema
        ema = torch.where(first.unsqueeze(-1), mean, ema)
        ema = torch.where(again.unsqueeze(-1), self.ema * ema + (1.0 - self.ema) * mean, ema)
        self._grad_ema = ema
        self._seen = self._seen | present

        if stats.val_grad is not None:
            val = stats.val_grad.to(DTYPE)
            val = val.mean(dim=0) if val.dim() == 2 else val.reshape(-1)
            if val.numel() != mean.shape[1]:
                raise ValueError(
                    f"dograph: DomainStats.val_grad has {val.numel()} features but grad has {mean.shape[1]}; "
                    "compute both with the same feature map (same projection / layer)."
                )
            if self._val_ema is None:
                self._val_ema = val
            else:
                self._val_ema = self.ema * self._val_ema + (1.0 - self.ema) * val
        elif self._val_ema is None:
            raise ValueError(
                "dograph needs DomainStats.val_grad (the validation gradient features, Tensor[d] or "
                "Tensor[D, d]) at least at the first update; compute it on the validation split."
            )

    def _apply(self, stats: DomainStats) -> torch.Tensor:
        self._update_ema(stats)
        assert self._grad_ema is not None and self._val_ema is not None
        sim = cosine_similarity(self._grad_ema, self._seen)
        self._adjacency = domain_graph(sim, threshold=self.threshold, knn=self.knn)
        lap = graph_laplacian(self._adjacency)
        self._align = alignment_scores(self._grad_ema, self._val_ema, self._seen, self.alignment)
        w, objectives = mirror_descent(
            align=self._align,
            laplacian=lap,
            prev=self._weights,
            step_size=self.step_size,
            laplacian_strength=self.laplacian_strength,
            kl=self.kl,
            iters=self.inner_iters,
            lr=self.inner_lr,
        )
        self.last_objectives = objectives
        return smooth(w, self.smoothing)

    def _extra_log(self) -> dict[str, float]:
        out = {f"align/{d}": float(v) for d, v in zip(self.domains, self._align.tolist())}
        if self.last_objectives.numel():
            out["dograph/objective"] = float(self.last_objectives[-1])
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "grad_ema": None if self._grad_ema is None else self._grad_ema.clone(),
            "val_ema": None if self._val_ema is None else self._val_ema.clone(),
            "seen": self._seen.clone(),
            "align": self._align.clone(),
            "adjacency": self._adjacency.clone(),
            # the last update's objective values, so a resumed run logs dograph/objective as an uninterrupted one
            "last_objectives": self.last_objectives.clone(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._grad_ema = None if state["grad_ema"] is None else state["grad_ema"].to(DTYPE).clone()
        self._val_ema = None if state["val_ema"] is None else state["val_ema"].to(DTYPE).clone()
        self._seen = state["seen"].clone()
        self._align = state["align"].to(DTYPE).clone()
        self._adjacency = state["adjacency"].to(DTYPE).clone()
        last = state.get("last_objectives")  # absent in checkpoints of older versions
        self.last_objectives = torch.zeros(0, dtype=DTYPE) if last is None else last.to(DTYPE).clone()
