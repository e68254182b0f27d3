"""The :class:`Selector` protocol and the :class:`Pool` a selector sees.

A selector is a pure decision rule: it receives a candidate pool (domain ids plus the features it
declared in ``requires``) and returns a :class:`mixsel.Selection`. It never touches the model; the
training step (``mixsel.step``) computes exactly the features the selector asks for.

Feature names (keys of ``Pool.features``), computed once per pool by ``mixsel.step``:

=====================  ==================  =========================================================
name                   shape               meaning
=====================  ==================  =========================================================
``loss``               [n]                 per-example mean token cross-entropy (labels != -100)
``confidence``         [n]                 per-example mean probability of the target tokens
``perplexity``         [n]                 exp(loss)
``completion_length``  [n]                 number of target tokens
``grad_norm``          [n]                 norm of the per-example gradient features
``hidden``             [n, H]              mean-pooled last hidden state
``grads``              [n, d]              per-example gradient features (exact or projected)
``gram``               [n, n]              inner products of the per-example gradient features
``val_scores``         [n, m]              inner products with m validation anchor gradients
``val_gram``           [m, m]              inner products among the validation anchor gradients
``zo_grads``           [n, d]              CoLM zeroth-order (SPSA) gradient features
=====================  ==================  =========================================================

Optional class attributes a selector may set (read with :func:`reference_features`,
:func:`reference_weights`):

* ``feature_defaults``: the gradient-feature settings its method was published with, applied when
  ``selection.features.source="auto"`` / ``normalize=None`` (default :data:`DEFAULT_FEATURES`:
  exact LM-head gradients, unnormalised);
* ``weighted_loss``: whether the method trains on its selection weights (CRAIG, GradMatch), the
  default of ``selection.use_weights``;
* ``needs_source_sizes``: whether ``Pool.source_sizes`` must be filled (CoLM's dataset-level
  small sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from mixsel.errors import DataError, UnknownNameError
from mixsel.seeding import pool_seed
from mixsel.solvers._checks import check_k
from mixsel.types import FEATURE_NAMES, Selection

__all__ = [
    "DEFAULT_FEATURES",
    "FEATURE_NAMES",
    "Pool",
    "Selector",
    "check_k",
    "check_pool",
    "reference_features",
    "reference_weights",
]

#: Gradient-feature settings of a selector that declares no ``feature_defaults``.
DEFAULT_FEATURES: dict[str, Any] = {"source": "lm_head", "normalize": False}


@dataclass
class Pool:
    """A candidate pool of ``n`` examples, as handed to :meth:`Selector.select`.

    Attributes:
        domains: LongTensor[n] domain id of each candidate.
        num_domains: number of domains in the mixture (ids are 0..num_domains-1).
        features: the features the selector declared, by name (see the module docstring).
        domain_weights: optional Tensor[num_domains] current domain weights (from a reweighter),
            which budget-aware selectors may use to set per-domain budgets.
        step: training step, for schedules and seeding.
        lr: current learning rate (PartitionSel and GREATS scale their utility by it).
        seed: base seed; selectors derive their per-step randomness from (seed, step).
        val_domains: optional LongTensor[m] domain id of each validation anchor (for domain-balanced
            validation targets).
        source_sizes: optional LongTensor[num_domains], training examples of each domain in the
            whole dataset (not the pool); CoLM decides its small sources from them.
    """

    domains: torch.Tensor
    num_domains: int
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    domain_weights: torch.Tensor | None = None
    step: int = 0
    lr: float = 1.0
    seed: int = 0
    val_domains: torch.Tensor | None = None
    source_sizes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_pool(self)

    @property
    def size(self) -> int:
        return int(self.domains.numel())

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, step, salt): identical on every rank."""
        g = torch.Generator()
        g.manual_seed(pool_seed(self.seed, self.step, salt))
        return g

    def feature(self, name: str) -> torch.Tensor:
        """The feature ``name``, or a clear error if the step did not compute it."""
        if name not in self.features:
            raise UnknownNameError(
                f"feature {name!r} is missing from the pool (have: {sorted(self.features)}); "
                "the selector must list it in its `requires`."
            )
        return self.features[name]

    def domain_counts(self) -> torch.Tensor:
        return torch.bincount(self.domains, minlength=self.num_domains)


# features with one row per candidate: their first dimension must be the pool size
_PER_CANDIDATE = FEATURE_NAMES - {"val_gram"}


def check_pool(pool: Pool) -> None:
    """One clear ``ValueError`` for a pool whose parts disagree: domain ids that are not integers in
    ``[0, num_domains)``, or a per-candidate feature whose rows do not match the candidates."""
    domains = pool.domains
    if not isinstance(domains, torch.Tensor):
        try:
            domains = pool.domains = torch.as_tensor(domains)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"Pool.domains must be a 1-D integer tensor of domain ids, got {domains!r}") from None
    if domains.dim() != 1 or domains.is_floating_point() or domains.is_complex() or domains.dtype == torch.bool:
        raise DataError(
            f"Pool.domains must be a 1-D integer tensor of domain ids, got {domains.dtype} of shape "
            f"{tuple(domains.shape)}"
        )
    num = pool.num_domains
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DataError(f"Pool.num_domains must be a positive integer, got {num!r}")
    n = domains.numel()
    if n and (int(domains.min()) < 0 or int(domains.max()) >= num):
        raise DataError(
            f"Pool.domains holds ids {int(domains.min())}..{int(domains.max())} but num_domains={num}: "
            f"ids must lie in [0, {num}); pass the mixture's number of domains"
        )
    for name, value in pool.features.items():
        if name not in _PER_CANDIDATE or not isinstance(value, torch.Tensor):
            continue
        rows = value.shape[0] if value.dim() else None
        square = name == "gram" and value.dim() == 2 and value.shape[1] != n
        if rows != n or square:
            raise DataError(
                f"feature {name!r} has shape {tuple(value.shape)} but the pool has {n} candidates (Pool.domains); "
                f"give one row per candidate{' ([n, n] for gram)' if name == 'gram' else ''}"
            )
    weights = pool.domain_weights
    if weights is not None and torch.as_tensor(weights).numel() != num:
        raise DataError(
            f"Pool.domain_weights has {torch.as_tensor(weights).numel()} entries but num_domains={num}; "
            "give one weight per domain"
        )


@runtime_checkable
class Selector(Protocol):
    """Picks ``k`` of the ``n`` pool candidates.

    Attributes:
        name: registered name.
        requires: feature names the step must compute for this selector.
    """

    name: str
    requires: frozenset[str]

    def select(self, pool: Pool, k: int) -> Selection:
        """Return a :class:`Selection` of exactly ``k`` distinct pool indices (unless documented)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def reference_features(selector: Any) -> dict[str, Any]:
    """The feature settings ``selector``'s method was published with (``source``, ``normalize``)."""
    return {**DEFAULT_FEATURES, **dict(getattr(selector, "feature_defaults", {}) or {})}


def reference_weights(selector: Any) -> bool:
    """Whether ``selector``'s method trains on its selection weights (its ``weighted_loss``)."""
    return bool(getattr(selector, "weighted_loss", False))
