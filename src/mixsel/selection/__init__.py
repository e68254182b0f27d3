"""Selectors: one module per method, each registered by name (see ``mixsel.registry``)."""

from mixsel.selection.base import FEATURE_NAMES, Pool, Selector, check_k, reference_features, reference_weights

__all__ = ["FEATURE_NAMES", "Pool", "Selector", "check_k", "reference_features", "reference_weights"]

# Importing the method modules registers them.
from mixsel.selection import big_loss as _big_loss  # noqa: F401
from mixsel.selection import colm as _colm  # noqa: F401
from mixsel.selection import completion_length as _completion_length  # noqa: F401
from mixsel.selection import craig as _craig  # noqa: F401
from mixsel.selection import grad_norm as _grad_norm  # noqa: F401
from mixsel.selection import gradmatch as _gradmatch  # noqa: F401
from mixsel.selection import greats as _greats  # noqa: F401
from mixsel.selection import hidden_fl as _hidden_fl  # noqa: F401
from mixsel.selection import least_confidence as _least_confidence  # noqa: F401
from mixsel.selection import middle_ppl as _middle_ppl  # noqa: F401
from mixsel.selection import partitionsel as _partitionsel  # noqa: F401
from mixsel.selection import random as _random  # noqa: F401
