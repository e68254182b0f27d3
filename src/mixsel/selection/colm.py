"""CoLM: mini-batch coresets for memory-efficient LM training on data mixtures
(Nguyen et al., ICLR 2025, "Mini-batch Coresets for Memory-efficient Language Model Training on
Data Mixtures", arXiv 2407.19580, Algorithm 1).

Per step, from a pool M of candidates with source (domain) labels and target batch size b:

1. **Keep small sources whole** (Sec. 4.1): S_s = every pool example of a *small source*, one
   with fewer than |V| / c examples in the whole training set V (c = number of sources). Which
   sources are small is decided once, from the dataset's per-domain sizes (``Pool.source_sizes``),
   not from the sampled pool.
2. **Budgets** (Alg. 1 line 7): b_q = (b - |S_s|) * |V_q| / (|M| - |S_s|) for each big source q
   (rounded as the reference code: floors, then the leftover units to the smallest floors first).
3. **Adam-normalised features** (Eq. 3-4): f_i = m_i / (eps + sqrt(v_i)) from the per-example
   zeroth-order V-projection gradients (Eq. 5-6, feature ``zo_grads``; one perturbation direction
   for the whole run) and running moments of the big sources, kept by this selector
   (:class:`mixsel.features.zeroth_order.AdamNormalizer`).
4. **Sparsify** (Eq. 7-8): per big source q, mask M_q keeps the h coordinates with the largest
   |mean_{i in V_q} f_i|.
5. **Medoids** (Eq. 8): per big source, greedy facility location maximising
   sum_{i in V_q} max_{s in S} [C - ||(f_i - f_s) * M_q||_1], C = max distance.
6. Uniform weights in the loss (``weighted_loss = False``); ``Selection.weights`` hold the medoids'
   cluster sizes (1 for the kept small-source examples), which ``selection.use_weights=true``
   applies (Table 2, "weighted medoids"). The moments are updated with the selected big-source
   features.

Sources without labels (the paper's SuperGLUE runs): ``sources="kmeans"`` clusters the pool's
mean-pooled hidden states into ``clusters`` pseudo-sources (seeded k-means++ and Lloyd iterations)
and applies the same rules to them, small clusters judged by their pool counts.

Switches reproduce the paper's ablations: Table 2 (``distance="cosine"``, ``keep_small=False``,
``per_source=False`` for one joint selection over the big sources, ``adam=False``), Table 3
(``sparsify="grad"|"random"|"none"``), Table 4 (``h``) and Table 5 (``feature="grads"``: exact
gradient features instead of zeroth-order ones). Layer choice (Table 6) is a feature-extraction
setting (``selection.features``), not a selector option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from mixsel.errors import ConfigError, DataError
from mixsel.features.zeroth_order import AdamNormalizer, topk_source_mask
from mixsel.registry import register_selector
from mixsel.seeding import Salt
from mixsel.selection.base import Pool, check_k
from mixsel.selection.budgets import ROUNDINGS, QuotaCarry, proportional_budgets
from mixsel.selection.hidden_fl import cosine_similarity_matrix
from mixsel.solvers.facility_location import facility_location, pairwise_l1, similarity_from_distance
from mixsel.types import Selection

__all__ = ["CoLMSelector", "kmeans", "small_source_mask"]


def small_source_mask(
    counts: torch.Tensor,
    *,
    rule: str = "fraction",
    c: float | None = None,
    max_keep: int | None = None,
    pool_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which sources are "small" (kept whole) from their sizes (CoLM Sec. 4.1, App. C).

    Args:
        counts: LongTensor[Q] examples per source: the whole training set's (the paper) or a
            pool's.
        rule: ``"fraction"``: n_q < |V| / c (c defaults to the number of sources Q, the paper's
            rule); ``"average"``: n_q below the average size of the non-empty sources (the
            MathInstruct heuristic of App. C); ``"none"``: no source is small.
        c: the divisor of the ``"fraction"`` rule.
        max_keep: if the small sources hold more than this many pool examples, the small sources
            largest in ``counts`` are demoted to big (ties: higher id first) until they fit, so a
            batch of ``max_keep`` can always hold them.
        pool_counts: LongTensor[Q] pool examples per source for ``max_keep`` (default ``counts``).

    Returns:
        BoolTensor[Q]; sources with no example (in ``counts``) are never small.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    pool_counts = counts if pool_counts is None else torch.as_tensor(pool_counts, dtype=torch.long)
    total = int(counts.sum())
    present = counts > 0
    if rule == "none":
        return torch.zeros_like(present)
    if rule == "fraction":
        divisor = float(counts.numel() if c is None else c)
        if divisor <= 0:
            raise ConfigError(f"small_c={c} must be positive (small sources have < |pool| / c examples)")
        small = present & (counts.to(torch.float64) < total / divisor)
    elif rule == "average":
        avg = total / max(int(present.sum()), 1)
        small = present & (counts.to(torch.float64) < avg)
    else:
        raise ConfigError(f"small_rule={rule!r}; choose 'fraction', 'average' or 'none'")
    if max_keep is not None:
        order = sorted(torch.nonzero(small).flatten().tolist(), key=lambda q: (-int(counts[q]), -q))
        for q in order:
            if int(pool_counts[small].sum()) <= max_keep:
                break
            small[q] = False
    return small


def kmeans(x: torch.Tensor, c: int, *, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Cluster the rows of ``x`` into ``c`` groups (k-means++ seeding, then Lloyd iterations).

    CoLM's pseudo-sources for data without source labels (arXiv 2407.19580, Sec. 5, SuperGLUE).

    Args:
        x: Tensor[n, H] points (e.g. mean-pooled hidden states).
        c: number of clusters (capped at n).
        generator: seeded CPU generator (identical on every rank).
        iters: Lloyd iterations (stops early when the assignment no longer changes).

    Returns:
        LongTensor[n] cluster ids in 0..c-1 (a cluster may end up empty).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [n, H] matrix, got shape {tuple(x.shape)}")
    if c < 1:
        raise ValueError(f"clusters={c} must be >= 1")
    x = x.to(torch.float64)
    n = x.shape[0]
    c = min(c, n)
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, c):
        d2 = torch.cdist(x, torch.stack(centres)).square().min(1).values
        if float(d2.sum()) <= 0:
            centres.append(x[int(torch.randint(n, (1,), generator=generator))])
            continue
        centres.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))])
    centre = torch.stack(centres)
    assign = torch.cdist(x, centre).argmin(1)
    for _ in range(iters):
        for j in range(c):
            members = assign == j
            if bool(members.any()):
                centre[j] = x[members].mean(0)
        new = torch.cdist(x, centre).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


@register_selector("colm")
class CoLMSelector:
    """CoLM (Algorithm 1): keep small sources, Adam-normalised sparse L1 medoids of big sources.

    Args:
        feature: ``"zo_grads"`` (zeroth-order V-projection gradients, the paper) or ``"grads"``
            (exact gradient features; Table 5 "sparsified actual grad").
        keep_small: keep every example of small sources (Table 2); False treats all as big.
        small_from: where source sizes come from: ``"dataset"`` (the paper and the reference
            code: decided once from ``pool.source_sizes``) or ``"pool"`` (each pool's counts).
        small_rule: ``"fraction"`` (n_q < |V| / c) or ``"average"`` (below the average size).
        small_c: c of the ``"fraction"`` rule; default the number of domains.
        small_sources: explicit ids of sources always kept whole (the reference code's
            ``keep_sources``); overrides ``small_rule``.
        sources: ``"labels"`` (the pool's domain ids) or ``"kmeans"`` (pseudo-sources from
            k-means on the pool's hidden states, for unlabelled data; needs the ``hidden``
            feature and judges small clusters by their pool counts).
        clusters: number of k-means pseudo-sources; default the number of domains.
        per_source: select medoids of each big source separately with b_q budgets (CoLM); False
            selects one joint set over all big-source examples (Table 2 ablation).
        adam: normalise features by the Adam moments (Eq. 3-4); False uses raw features.
        beta1, beta2, adam_eps: Adam moment parameters of the normaliser.
        sparsify: ``"grad"`` (top-h by |mean normalised feature| per source, Eq. 8), ``"random"``
            (h random coordinates, Table 3) or ``"none"`` (all coordinates).
        h: coordinates kept by the mask (Table 4; the paper uses the hidden size, 2560 for Phi-2).
        distance: ``"l1"`` (Eq. 8) or ``"cosine"`` (Table 2 ablation).
        rounding: rounding of the b_q budgets (:func:`mixsel.selection.budgets.round_quotas`;
            default the reference code's smallest-first rule; ``"carry"`` carries each source's
            remainder across steps, saved as ``state_dict()["budget_carry"]``; with
            ``sources="kmeans"`` the clusters are renumbered every pool, so it only evens out cluster ids).
        seed_salt: salt of ``pool.generator`` for ``sparsify="random"``.

    State: the Adam moments (``state_dict()["normalizer"]``), and the budget carry
    (``state_dict()["budget_carry"]``) with ``rounding="carry"``.
    """

    name = "colm"
    weighted_loss = False

    def __init__(
        self,
        feature: str = "zo_grads",
        keep_small: bool = True,
        small_from: str = "dataset",
        small_rule: str = "fraction",
        small_c: float | None = None,
        small_sources: Sequence[int] | None = None,
        sources: str = "labels",
        clusters: int | None = None,
        per_source: bool = True,
        adam: bool = True,
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        sparsify: str = "grad",
        h: int = 2560,
        distance: str = "l1",
        rounding: str = "smallest_first",
        seed_salt: int = Salt.COLM_SPARSIFY,
    ) -> None:
        if feature not in ("zo_grads", "grads"):
            raise ConfigError(f"feature={feature!r}; choose 'zo_grads' (zeroth-order, CoLM) or 'grads' (exact)")
        if small_rule not in ("fraction", "average"):
            raise ConfigError(f"small_rule={small_rule!r}; choose 'fraction' (|V|/c) or 'average'")
        if small_from not in ("dataset", "pool"):
            raise ConfigError(f"small_from={small_from!r}; choose 'dataset' (CoLM) or 'pool'")
        if sources not in ("labels", "kmeans"):
            raise ConfigError(f"sources={sources!r}; choose 'labels' (domain ids) or 'kmeans' (hidden-state clusters)")
        if clusters is not None and clusters < 1:
            raise ConfigError(f"clusters={clusters} must be >= 1 (k-means pseudo-sources)")
        if sparsify not in ("grad", "random", "none"):
            raise ConfigError(
                f"sparsify={sparsify!r}; choose 'grad', 'random' or 'none' (the weight-magnitude criteria of "
                "Table 3 need model weights, which a selector does not see)"
            )
        if h <= 0:
            raise ConfigError(f"h={h} must be positive (coordinates kept per source)")
        if distance not in ("l1", "cosine"):
            raise ConfigError(f"distance={distance!r}; choose 'l1' (CoLM Eq. 8) or 'cosine'")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        self.feature = feature
        self.sources = sources
        self.clusters = clusters
        self.requires = frozenset({feature, "hidden"} if sources == "kmeans" else {feature})
        self.keep_small = bool(keep_small)
        self.small_from = small_from
        self.small_rule = small_rule
        self.small_c = small_c
        self.small_sources = None if small_sources is None else [int(q) for q in small_sources]
        self.per_source = bool(per_source)
        self.adam = bool(adam)
        self.normalizer = AdamNormalizer(beta1=beta1, beta2=beta2, eps=adam_eps)
        self.sparsify = sparsify
        self.h = int(h)
        self.distance = distance
        self.rounding = rounding
        self.carry = QuotaCarry() if rounding == "carry" else None
        self.seed_salt = int(seed_salt)

    @property
    def needs_source_sizes(self) -> bool:
        """Whether the step must fill ``Pool.source_sizes`` (dataset-level small sources)."""
        return (
            self.keep_small and self.small_sources is None and self.small_from == "dataset" and self.sources == "labels"
        )

    # -- pieces -------------------------------------------------------------------------------
    def small_sources_of(self, pool: Pool, k: int) -> torch.Tensor:
        """BoolTensor[num_domains]: the sources kept whole in this pool."""
        counts = pool.domain_counts()
        if not self.keep_small:
            return torch.zeros(pool.num_domains, dtype=torch.bool)
        if self.small_sources is not None:
            small = torch.zeros(pool.num_domains, dtype=torch.bool)
            for q in self.small_sources:
                if not 0 <= q < pool.num_domains:
                    raise ConfigError(f"small_sources has id {q}, but the mixture has {pool.num_domains} domains")
                small[q] = counts[q] > 0
            if int(counts[small].sum()) > k:
                raise ConfigError(
                    f"small_sources {self.small_sources} hold {int(counts[small].sum())} pool examples, "
                    f"more than the batch k={k}; raise train.batch_size or list fewer sources"
                )
            return small
        if self.small_from == "pool" or self.sources == "kmeans":
            return small_source_mask(counts, rule=self.small_rule, c=self.small_c, max_keep=k)
        sizes = pool.source_sizes
        if sizes is None:
            raise ConfigError(
                "colm decides its small sources from the dataset's per-domain sizes (Pool.source_sizes), "
                "which this pool lacks: let the training step fill them, or set small_sources=[...] or "
                "small_from='pool'"
            )
        sizes = torch.as_tensor(sizes, dtype=torch.long)
        if sizes.numel() != pool.num_domains:
            raise ConfigError(f"pool.source_sizes has {sizes.numel()} entries but the mixture has {pool.num_domains}")
        small = small_source_mask(sizes, rule=self.small_rule, c=self.small_c, max_keep=k, pool_counts=counts)
        return small & (counts > 0)

    def _pseudo_sources(self, pool: Pool) -> Pool:
        """``pool`` with its domain ids replaced by k-means clusters of its hidden states."""
        c = self.clusters or pool.num_domains
        assign = kmeans(pool.feature("hidden"), c, generator=pool.generator(Salt.COLM_KMEANS))
        return dataclasses.replace(pool, domains=assign, num_domains=c, source_sizes=None, domain_weights=None)

    def _mask(self, feats: torch.Tensor, groups: torch.Tensor, num_groups: int, pool: Pool) -> torch.Tensor:
        d = feats.shape[1]
        h = min(self.h, d)
        if self.sparsify == "none" or h == d:
            return torch.ones(num_groups, d, dtype=torch.bool)
        if self.sparsify == "grad":
            return topk_source_mask(feats, groups, h, num_domains=num_groups)
        g = pool.generator(self.seed_salt)
        mask = torch.zeros(num_groups, d, dtype=torch.bool)
        for q in range(num_groups):
            mask[q, torch.randperm(d, generator=g)[:h]] = True
        return mask

    def _medoids(self, feats: torch.Tensor, budget: int) -> Selection:
        l1 = self.distance == "l1"
        sim = similarity_from_distance(pairwise_l1(feats)) if l1 else cosine_similarity_matrix(feats)
        return facility_location(sim, budget)

    # -- protocol -----------------------------------------------------------------------------
    def select(self, pool: Pool, k: int) -> Selection:
        check_k(k, pool.size)
        if self.sources == "kmeans":
            pool = self._pseudo_sources(pool)
        raw = pool.feature(self.feature)
        if raw.dim() != 2 or raw.shape[0] != pool.size:
            raise ValueError(f"feature {self.feature!r} must be [n={pool.size}, d], got {tuple(raw.shape)}")
        raw = raw.to(torch.float64) if raw.dtype == torch.float64 else raw.to(torch.float32)
        small = self.small_sources_of(pool, k)
        kept = torch.nonzero(small[pool.domains]).flatten()
        big_rows = torch.nonzero(~small[pool.domains]).flatten()
        rest = k - kept.numel()
        info: dict[str, Any] = {"method": self.name, "small_sources": torch.nonzero(small).flatten().tolist()}
        if self.sources == "kmeans":
            info["clusters"] = pool.domains.tolist()

        picks: list[torch.Tensor] = [kept]
        weights: list[torch.Tensor] = [torch.ones(kept.numel())]
        selected_big = torch.empty(0, dtype=torch.long)
        if rest > 0:
            feats = self.normalizer.normalize(raw[big_rows]) if self.adam else raw[big_rows]
            if self.per_source:
                groups = pool.domains[big_rows]
                num_groups = pool.num_domains
                counts = torch.bincount(groups, minlength=num_groups)
                budgets = proportional_budgets(counts, rest, rounding=self.rounding, carry=self.carry)
            else:
                groups = torch.zeros(big_rows.numel(), dtype=torch.long)
                num_groups = 1
                budgets = torch.tensor([rest])
            info["budgets"] = budgets.tolist()
            mask = self._mask(feats, groups, num_groups, pool)
            chosen = []
            for q in range(num_groups):
                if int(budgets[q]) == 0:
                    continue
                members = torch.nonzero(groups == q).flatten()
                sel = self._medoids(feats[members][:, mask[q]], int(budgets[q]))
                chosen.append(members[sel.indices])
                weights.append(sel.weights.to(torch.float32))
            local = torch.cat(chosen)
            selected_big = big_rows[local]
            picks.append(selected_big)
            if self.adam:
                self.normalizer.update(raw[selected_big])
        indices = torch.cat(picks)
        info["kept"] = int(kept.numel())
        return Selection(indices=indices, weights=torch.cat(weights), info=info)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"normalizer": self.normalizer.state_dict()}
        if self.carry is not None:
            state.update(self.carry.selector_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "normalizer" not in state:
            raise DataError("colm state is missing 'normalizer' (the Adam moments); was it saved by CoLMSelector?")
        self.normalizer.load_state_dict(state["normalizer"])
        if self.carry is not None:
            self.carry.load_selector_state(state)
