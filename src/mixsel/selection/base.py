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

from mixsel.seeding import pool_seed
from mixsel.solvers._checks import check_k
from mixsel.types import FEATURE_NAMES, Selection

__all__ = [
    "DEFAULT_FEATURES",
    "FEATURE_NAMES",
    "Pool",
    "Selector",
    "check_k",
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
            raise KeyError(
                f"feature {name!r} is missing from the pool (have: {sorted(self.features)}); "
                "the selector must list it in its `requires`."
            )
        return self.features[name]

    def domain_counts(self) -> torch.Tensor:
        return torch.bincount(self.domains, minlength=self.num_domains)


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
