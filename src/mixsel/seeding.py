"""Every seed mixsel derives from the run's seed, in one place.

A run is reproducible from ``seed`` alone: each random choice draws from a ``torch.Generator``
seeded by a fixed function of (run seed, step, purpose). The same function on every rank gives
every rank the same draws, which is how distributed selection stays rank-symmetric. The formulas
and salts are part of the results' reproducibility: changing one changes every run's picks.

=========================  ================================================  =========================
purpose                    seed                                              used by
=========================  ================================================  =========================
validation anchors         ``seed * P + step``                               :mod:`mixsel.bookkeeping`
a selector's draws         ``(seed * P + step * Q + salt) mod 2^63-1``       :meth:`Pool.generator`
per-rank selection seed    ``seed + P * rank``                               ``distributed_selection=local``
SPSA directions (CoLM)     ``seed * Q`` (fixed) or ``seed * Q + step``       :mod:`mixsel.features.zeroth_order`
                           (per_step), then (that, k)
projection of module ``m``  ``seed * Q + m``, then per block                 :mod:`mixsel.features.projection`
=========================  ================================================  =========================

with ``P = 1_000_003`` and ``Q = 7_919``; the selector salts are the :class:`Salt` members.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "Salt",
    "anchor_seed",
    "direction_seed",
    "pool_seed",
    "projection_block_seed",
    "projection_seed",
    "rank_seed",
    "spsa_seed",
]

P = 1_000_003
Q = 7_919
_MOD = 2**63 - 1


class Salt(IntEnum):
    """Salts of :meth:`mixsel.selection.Pool.generator`, one per purpose (selectors' defaults)."""

    RANDOM = 11
    STRATIFIED = 13
    COLM_SPARSIFY = 29
    PARTITIONSEL = 31
    COLM_KMEANS = 37  # CoLM's k-means pseudo-sources (unlabelled data)
    GRADMATCH_FILL = 41  # GradMatch's random fill when OMP stops early
    CONFLICTS_REFERENCE = 97  # the random batch the conflict diagnostics compare against


def anchor_seed(seed: int, step: int) -> int:
    """Seed of the validation anchors drawn at ``step``."""
    return int(seed) * P + int(step)


def pool_seed(seed: int, step: int, salt: int) -> int:
    """Seed of a selector's generator at ``step`` for one purpose (``salt``)."""
    return (int(seed) * P + int(step) * Q + int(salt)) % _MOD


def rank_seed(seed: int, rank: int) -> int:
    """The selection seed of ``rank`` when every rank selects from its own shard (rank 0 keeps ``seed``)."""
    return int(seed) + P * int(rank)


def spsa_seed(seed: int, step: int) -> int:
    """Seed of the SPSA perturbation at ``step`` (CoLM's zeroth-order features; step 0 for the fixed direction)."""
    return int(seed) * Q + int(step)


def direction_seed(seed: int, k: int) -> int:
    """Seed of the ``k``-th SPSA direction drawn from ``seed``."""
    return (int(seed) * P + int(k) * 15_485_863 + 7) % _MOD


def projection_seed(seed: int, module_index: int) -> int:
    """Seed of the random projection of the ``module_index``-th gradient source."""
    return int(seed) * Q + int(module_index)


def projection_block_seed(seed: int, block: int) -> int:
    """Seed of block ``block`` of a projection matrix generated from ``seed``."""
    return (int(seed) * P + int(block) * Q + 104_729) % _MOD
