"""Registries of selectors and reweighters, looked up by name (as peft's ``register_peft_method``).

Adding a method is a checklist: a module under ``mixsel.selection`` (or ``mixsel.reweighting``)
decorated with :func:`register_selector` (or :func:`register_reweighter`), tests, a benchmark entry.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "available_reweighters",
    "available_selectors",
    "get_reweighter",
    "get_selector",
    "register_reweighter",
    "register_selector",
]

T = TypeVar("T")

_SELECTORS: dict[str, Callable[..., Any]] = {}
_REWEIGHTERS: dict[str, Callable[..., Any]] = {}


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name]!r}")
        table[name] = obj  # type: ignore[assignment]
        with contextlib.suppress(AttributeError, TypeError):
            obj.name = name  # type: ignore[attr-defined]
        return obj

    return deco


def register_selector(name: str) -> Callable[[T], T]:
    """Class decorator registering a :class:`mixsel.selection.Selector` under ``name``."""
    return _register(_SELECTORS, "selector", name)


def register_reweighter(name: str) -> Callable[[T], T]:
    """Class decorator registering a :class:`mixsel.reweighting.Reweighter` under ``name``."""
    return _register(_REWEIGHTERS, "reweighter", name)


def _load(package: str) -> None:
    # Importing the package imports every method module, which registers it.
    importlib.import_module(package)


def available_selectors() -> list[str]:
    """Sorted names of every registered selector."""
    _load("mixsel.selection")
    return sorted(_SELECTORS)


def available_reweighters() -> list[str]:
    """Sorted names of every registered reweighter."""
    _load("mixsel.reweighting")
    return sorted(_REWEIGHTERS)


def get_selector(name: str, **config: Any) -> Any:
    """Build the selector registered as ``name`` with keyword ``config``.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    _load("mixsel.selection")
    if name not in _SELECTORS:
        raise KeyError(
            f"unknown selector {name!r}; valid names: {', '.join(sorted(_SELECTORS))}. "
            "Set selection.method to one of them."
        )
    return _SELECTORS[name](**config)


def get_reweighter(name: str, domains: list[str] | None = None, **config: Any) -> Any:
    """Build the reweighter registered as ``name`` for ``domains`` with keyword ``config``.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    _load("mixsel.reweighting")
    if name not in _REWEIGHTERS:
        raise KeyError(
            f"unknown reweighter {name!r}; valid names: {', '.join(sorted(_REWEIGHTERS))}. "
            "Set reweighting.method to one of them."
        )
    if domains is None:
        raise ValueError(f"get_reweighter({name!r}) needs domains=[...] (the domain names, in id order)")
    return _REWEIGHTERS[name](domains=list(domains), **config)
