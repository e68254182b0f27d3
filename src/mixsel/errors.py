"""The errors mixsel raises for a user's mistake, as distinct from its own bugs.

A :class:`MixselError` means the input is wrong: a config value or key, a method option, a data
file, a command-line argument, the environment. Its message is one line naming the problem and
the fix, and ``mixsel`` prints it as ``mixsel: error: <message>`` (exit status 2). Any other
``KeyError``, ``TypeError``, ``AttributeError``... escaping a command is a bug in mixsel: the CLI
says ``mixsel: internal error`` with the file and line it came from (exit status 1).

Each subclass also extends the built-in type mixsel raised before it existed, so code that catches
``ValueError``, ``KeyError``, ``TypeError`` or ``FloatingPointError`` keeps working::

    try:
        get_selector("nope")
    except MixselError as err:  # also caught by ``except KeyError``
        print(err)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DivergedError",
    "MixselError",
    "OptionError",
    "UnknownNameError",
]


class MixselError(Exception):
    """A user error: bad input, config, data, options or environment; the message names the fix."""


class ConfigError(MixselError, ValueError):
    """A bad value: a config field, an override, a command-line flag, an argument to a mixsel API."""


class UnknownNameError(MixselError, KeyError):
    """An unknown name: a selector, reweighter, config key or section; the message lists the valid ones.

    Unlike a plain ``KeyError``, ``str()`` gives the message itself, not its ``repr``.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class OptionError(MixselError, TypeError):
    """A value of the wrong type, or a method option its class does not take (unknown or missing)."""


class DataError(MixselError, ValueError):
    """Bad data: a data file, a dataset, a tokenizer's output, saved features, a checkpoint."""


class DivergedError(MixselError, FloatingPointError):
    """Training diverged (non-finite or exploding loss, gradient or weights); the message says how to resume."""
