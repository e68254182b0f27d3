"""mixsel: online minibatch selection and domain reweighting for LM training on data mixtures."""

from mixsel.errors import MixselError
from mixsel.registry import (
    available_reweighters,
    available_selectors,
    get_reweighter,
    get_selector,
    register_reweighter,
    register_selector,
)
from mixsel.types import DomainStats, Selection

__version__ = "0.1.0"

__all__ = [
    "DomainStats",
    "MixselError",
    "Selection",
    "__version__",
    "available_reweighters",
    "available_selectors",
    "get_reweighter",
    "get_selector",
    "register_reweighter",
    "register_selector",
]
