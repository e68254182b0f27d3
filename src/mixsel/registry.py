"""Registries of selectors and reweighters, looked up by name (as peft's ``register_peft_method``).

Adding a method is a checklist: a module under ``mixsel.selection`` (or ``mixsel.reweighting``)
decorated with :func:`register_selector` (or :func:`register_reweighter`), tests, a benchmark entry.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from mixsel.errors import ConfigError, OptionError, UnknownNameError

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
            raise ConfigError(f"{kind} {name!r} is already registered by {table[name]!r}")
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


_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_PLURAL = {"true/false": "true/false values", "an integer": "integers", "a number": "numbers", "a string": "strings"}


def _describe(tp: Any) -> str:
    """``tp`` in words: ``an integer``, ``a list of numbers``, ``a number or null``..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence):
        return f"a list of {_PLURAL.get(_describe(args[0]), _describe(args[0]))}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp in _KINDS:
        return _KINDS[tp]
    if isinstance(tp, type) and issubclass(tp, int):
        return "an integer"
    return getattr(tp, "__name__", str(tp))


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the type of the annotation ``tp``; True for one it cannot check.

    Only the kind of value is checked (a number, a string, a list of numbers...): each method checks
    its own ranges and choices, with messages that name them.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, (str, typing.TypeVar)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(arg, value) for arg in args)
    if origin is typing.Literal:  # the method names the valid choices itself
        return isinstance(value, tuple({type(arg) for arg in args}))
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
            return False
        element = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else Any
        return not isinstance(value, (list, tuple)) or all(_fits(element, v) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(tp, type) and issubclass(tp, int):  # int, and IntEnum salts
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(tp, type) and origin is None:
        return isinstance(value, tp)
    return True


def _check_types(build: Callable[..., Any], kind: str, name: str, config: dict[str, Any]) -> None:
    """Raise :class:`OptionError` for an option whose value is not of its annotated type."""
    try:
        hints = typing.get_type_hints(build.__init__ if isinstance(build, type) else build)
    except Exception:  # an annotation that does not resolve: leave the checks to the method
        return
    for option, value in config.items():
        if option in hints and option != "domains" and not _fits(hints[option], value):
            raise OptionError(
                f"{kind} {name!r} option {option}={value!r} has the wrong type: expected {_describe(hints[option])}"
            )


def _build(table: dict[str, Callable[..., Any]], kind: str, name: str, /, **config: Any) -> Any:
    """``table[name](**config)``, after checking that it takes these keyword options.

    Raises:
        OptionError: an option the method does not take, a required one missing (the message lists
            its options), or a value of another type than its annotation. Errors raised while
            building it (a value out of range: a ``ConfigError``) pass through.
    """
    build = table[name]
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call check
        return build(**config)
    try:
        signature.bind(**config)
    except TypeError as err:
        keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names = ", ".join(p.name for p in signature.parameters.values() if p.kind in keywords and p.name != "domains")
        names = names or "none"
        raise OptionError(f"{kind} {name!r} {err} (its options: {names})") from None
    _check_types(build, kind, name, config)
    return build(**config)


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
        UnknownNameError: unknown name (a ``KeyError``); the message lists the valid ones.
        OptionError: an option the selector does not take (a ``TypeError``).
    """
    _load("mixsel.selection")
    if name not in _SELECTORS:
        raise UnknownNameError(
            f"unknown selector {name!r}; valid names: {', '.join(sorted(_SELECTORS))}. "
            "Set selection.method to one of them."
        )
    return _build(_SELECTORS, "selector", name, **config)


def get_reweighter(name: str, domains: list[str] | None = None, **config: Any) -> Any:
    """Build the reweighter registered as ``name`` for ``domains`` with keyword ``config``.

    Raises:
        UnknownNameError: unknown name (a ``KeyError``); the message lists the valid ones.
        ConfigError: no ``domains`` (a ``ValueError``).
        OptionError: an option the reweighter does not take (a ``TypeError``).
    """
    _load("mixsel.reweighting")
    if name not in _REWEIGHTERS:
        raise UnknownNameError(
            f"unknown reweighter {name!r}; valid names: {', '.join(sorted(_REWEIGHTERS))}. "
            "Set reweighting.method to one of them."
        )
    if domains is None:
        raise ConfigError(f"get_reweighter({name!r}) needs domains=[...] (the domain names, in id order)")
    return _build(_REWEIGHTERS, "reweighter", name, domains=list(domains), **config)
