"""Selectors: one module per method, each registered by name (see ``mixsel.registry``)."""

from mixsel.selection.base import FEATURE_NAMES, Pool, Selector, check_k

__all__ = ["FEATURE_NAMES", "Pool", "Selector", "check_k"]

# Importing the method modules registers them.
from mixsel.selection import random as _random  # noqa: F401
