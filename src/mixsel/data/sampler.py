"""Draw candidate pools from a multi-domain train split following domain weights.

Each training step, :class:`CandidateSampler` draws a *pool* of ``pool_size`` example indices; a
selector then picks the minibatch from that pool. A draw has two stages:

1. **Allocation**: how many pool slots each domain gets, from the domain weights ``w`` (``None`` =
   the natural proportions ``n_d / N``). ``allocation="multinomial"`` samples the counts
   ``c ~ Multinomial(pool_size, w)`` (unbiased, the counts vary from draw to draw);
   ``allocation="proportional"`` rounds ``pool_size * w`` by largest remainder (Hamilton's
   method; ties go to the lower domain id), so the counts are deterministic and within one of the
   exact share.
2. **Within a domain**: examples are taken in the order of a shuffled *epoch permutation* of that
   domain, without replacement; when the permutation is used up, a new one is drawn. A pool never
   holds the same example twice unless its domain's count exceeds the domain's size (then the
   domain wraps around its examples).

The pool is finally shuffled, so its order carries no domain information.

All randomness comes from one CPU ``torch.Generator`` owned by the sampler (never the global RNG), so
every rank of a distributed job that builds the sampler with the same seed draws the same pools, and
:meth:`CandidateSampler.state_dict` / :meth:`CandidateSampler.load_state_dict` resume exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from mixsel.errors import DataError

__all__ = ["CandidateSampler", "allocate_counts", "check_weights"]

_ALLOCATIONS = ("multinomial", "proportional")
_STATE_VERSION = 1


def check_weights(weights: Any, num_domains: int) -> torch.Tensor:
    """Float64 domain weights normalised to sum 1: one per domain, finite, non-negative, not all zero.

    Raises:
        DataError: naming what is wrong with ``weights``.
    """
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64).reshape(-1)
    if w.numel() != num_domains:
        raise DataError(
            f"weights has {w.numel()} entries but there are {num_domains} domains; give one weight per domain"
        )
    if not torch.isfinite(w).all():
        raise DataError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise DataError(f"weights must be non-negative, got {w.tolist()}")
    if float(w.sum()) <= 0:
        raise DataError("weights are all zero; give at least one domain a positive weight")
    return w / w.sum()


def allocate_counts(p: torch.Tensor, pool_size: int, allocation: str, generator: torch.Generator) -> torch.Tensor:
    """LongTensor[D]: pool slots per domain for the normalised weights ``p`` (module docstring, stage 1).

    ``"multinomial"`` draws the counts from ``generator``; ``"proportional"`` rounds by largest
    remainder and consumes no randomness. :class:`CandidateSampler` and
    :class:`mixsel.data.streaming.StreamingSampler` both allocate with it.
    """
    num_domains = p.numel()
    if allocation == "multinomial":
        picks = torch.multinomial(p, pool_size, replacement=True, generator=generator)
        return torch.bincount(picks, minlength=num_domains)
    exact = p * pool_size
    counts = torch.floor(exact).to(torch.long)
    remainder = exact - counts.to(torch.float64)
    short = pool_size - int(counts.sum())
    if short > 0:
        # largest remainder first; ties to the lower id (stable sort on the negated remainder)
        order = torch.sort(-remainder, stable=True).indices
        counts[order[:short]] += 1
    return counts


def _fingerprint(domain_ids: torch.Tensor) -> str:
    """A checksum of the domain-id vector (to catch resuming a sampler on other data)."""
    return hashlib.sha256(domain_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class CandidateSampler:
    """Seeded, resumable sampler of candidate pools of train-example indices, by domain weights.

    Args:
        domain_ids: LongTensor[N], the domain of each train example (ids in ``[0, num_domains)``).
        pool_size: examples per pool (a positive integer).
        seed: seed of the sampler's private generator.
        weights: default domain weights (Tensor[D], non-negative, any positive total); ``None`` means
            the natural proportions ``n_d / N``.
        num_domains: ``D``; defaults to ``max(domain_ids) + 1``. Domains without examples must get
            weight 0.
        allocation: ``"multinomial"`` or ``"proportional"`` (see the module docstring).

    Example:
        >>> s = CandidateSampler(torch.tensor([0, 0, 0, 1]), pool_size=2, seed=0)
        >>> s.draw().shape
        torch.Size([2])
    """

    def __init__(
        self,
        domain_ids: torch.Tensor,
        pool_size: int,
        *,
        seed: int,
        weights: torch.Tensor | None = None,
        num_domains: int | None = None,
        allocation: str = "multinomial",
    ) -> None:
        domain_ids = torch.as_tensor(domain_ids, dtype=torch.long).reshape(-1).cpu()
        if domain_ids.numel() == 0:
            raise DataError("domain_ids is empty: the train split has no examples to sample from")
        if int(pool_size) != pool_size or pool_size < 1:
            raise DataError(f"pool_size must be a positive integer, got {pool_size!r}")
        if allocation not in _ALLOCATIONS:
            raise DataError(f"allocation={allocation!r} is unknown; use one of {list(_ALLOCATIONS)}")
        if int(domain_ids.min()) < 0:
            raise DataError(f"domain_ids must be non-negative, found {int(domain_ids.min())}")
        inferred = int(domain_ids.max()) + 1
        if num_domains is None:
            num_domains = inferred
        elif num_domains < inferred:
            raise DataError(
                f"num_domains={num_domains} but domain_ids contains the id {inferred - 1}; raise num_domains"
            )
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.num_domains = int(num_domains)
        self.allocation = allocation
        self._domain_ids = domain_ids
        self._sizes = torch.bincount(domain_ids, minlength=self.num_domains)
        self._members = [torch.nonzero(domain_ids == d, as_tuple=False).reshape(-1) for d in range(self.num_domains)]
        self._fingerprint = _fingerprint(domain_ids)
        self.weights = self._check_weights(self._natural() if weights is None else weights)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._perms = [self._shuffle(d) for d in range(self.num_domains)]
        self._positions = [0] * self.num_domains
        self._epochs = [0] * self.num_domains
        self.draws = 0

    # ---- properties ------------------------------------------------------------------------------

    @property
    def domain_sizes(self) -> torch.Tensor:
        """LongTensor[D]: the number of train examples of each domain."""
        return self._sizes.clone()

    @property
    def epochs(self) -> list[int]:
        """How many times each domain's permutation has been used up so far."""
        return list(self._epochs)

    # ---- weights and allocation -----------------------------------------------------------------

    def _natural(self) -> torch.Tensor:
        return self._sizes.to(torch.float64) / float(self._sizes.sum())

    def _check_weights(self, weights: Any) -> torch.Tensor:
        w = check_weights(weights, self.num_domains)
        empty = [d for d in range(self.num_domains) if w[d] > 0 and int(self._sizes[d]) == 0]
        if empty:
            raise DataError(f"domain(s) {empty} have no train examples but a positive weight; set their weight to 0")
        return w

    def allocate(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor[D]: pool slots per domain for ``weights`` (consumes randomness if multinomial)."""
        p = self.weights if weights is None else self._check_weights(weights)
        return allocate_counts(p, self.pool_size, self.allocation, self._gen)

    # ---- drawing --------------------------------------------------------------------------------

    def _shuffle(self, d: int) -> torch.Tensor:
        members = self._members[d]
        return members[torch.randperm(members.numel(), generator=self._gen)]

    def _take(self, d: int, count: int) -> torch.Tensor:
        """``count`` indices of domain ``d`` from its epoch permutation, reshuffling when used up."""
        taken: list[torch.Tensor] = []
        need = count
        while need > 0:
            perm, pos = self._perms[d], self._positions[d]
            if pos >= perm.numel():
                fresh = self._shuffle(d)
                if taken and count <= fresh.numel():
                    # examples already in this pool go to the end of the new epoch: no duplicates
                    seen = torch.isin(fresh, torch.cat(taken))
                    fresh = torch.cat([fresh[~seen], fresh[seen]])
                self._perms[d], self._positions[d] = fresh, 0
                self._epochs[d] += 1
                continue
            step = min(need, perm.numel() - pos)
            taken.append(perm[pos : pos + step])
            self._positions[d] = pos + step
            need -= step
        return torch.cat(taken) if taken else torch.zeros(0, dtype=torch.long)

    def draw(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor[pool_size]: indices into the train split for the next candidate pool.

        Args:
            weights: domain weights for this draw (Tensor[D]); ``None`` uses the sampler's default.

        Raises:
            ValueError: weights of the wrong length, negative, non-finite, all zero, or positive on a
                domain without examples.
        """
        counts = self.allocate(weights)
        parts = [self._take(d, int(c)) for d, c in enumerate(counts.tolist()) if c > 0]
        pool = torch.cat(parts)
        pool = pool[torch.randperm(pool.numel(), generator=self._gen)]
        self.draws += 1
        return pool

    @staticmethod
    def shard(pool: torch.Tensor, rank: int, world_size: int, *, mode: str = "strided") -> torch.Tensor:
        """This rank's share of a pool (or of a selection) for distributed training.

        ``mode="strided"`` (default) gives rank ``r`` the entries ``r, r + W, r + 2W, ...``;
        ``mode="contiguous"`` gives it one block, the first ``len % W`` ranks one entry more. Either
        way the shares are disjoint, cover the pool, and differ in size by at most one.
        """
        if int(world_size) != world_size or world_size < 1:
            raise DataError(f"world_size must be a positive integer, got {world_size!r}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), got {rank!r}")
        if mode == "strided":
            return pool[rank::world_size]
        if mode == "contiguous":
            base, extra = divmod(pool.shape[0], world_size)
            start = rank * base + min(rank, extra)
            return pool[start : start + base + (1 if rank < extra else 0)]
        raise DataError(f"mode={mode!r} is unknown; use 'strided' or 'contiguous'")

    # ---- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact sequence of pools (tensors are copies)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "pool_size": self.pool_size,
            "allocation": self.allocation,
            "num_domains": self.num_domains,
            "domain_sizes": self._sizes.clone(),
            "fingerprint": self._fingerprint,
            "weights": self.weights.clone(),
            "generator": self._gen.get_state(),
            "perms": [p.clone() for p in self._perms],
            "positions": list(self._positions),
            "epochs": list(self._epochs),
            "draws": self.draws,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next draws continue the saved sequence exactly.

        Raises:
            ValueError: the state was saved by a sampler over different data, pool size or
                allocation (exact continuation would be impossible).
        """
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}")
        for key, mine in (
            ("pool_size", self.pool_size),
            ("allocation", self.allocation),
            ("num_domains", self.num_domains),
            ("fingerprint", self._fingerprint),
        ):
            if state[key] != mine:
                raise DataError(
                    f"cannot resume: the saved sampler has {key}={state[key]!r} but this one has {mine!r} "
                    "(the train split or the pool settings changed since the checkpoint)"
                )
        if not torch.equal(torch.as_tensor(state["domain_sizes"]), self._sizes):
            raise DataError("cannot resume: the saved sampler was built on a train split with other domain sizes")
        self.seed = int(state["seed"])
        self.weights = torch.as_tensor(state["weights"], dtype=torch.float64).clone()
        self._gen.set_state(state["generator"])
        self._perms = [torch.as_tensor(p, dtype=torch.long).clone() for p in state["perms"]]
        self._positions = [int(x) for x in state["positions"]]
        self._epochs = [int(x) for x in state["epochs"]]
        self.draws = int(state["draws"])
