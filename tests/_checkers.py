"""A user-defined answer checker, named by ``eval.answer_checker=_checkers:same_last_word`` in tests."""

from __future__ import annotations

#: (prediction, reference) of every call, so tests can see what the checker was given.
CALLS: list[tuple[str, str]] = []


def same_last_word(prediction: str, reference: str) -> bool:
    """True when the last words agree (ignoring a final period)."""
    CALLS.append((prediction, reference))
    words = prediction.replace(".", " ").split()
    return bool(words) and words[-1] == reference.strip()


def accept(prediction: str, reference: str) -> bool:
    """Always right; records the call."""
    CALLS.append((prediction, reference))
    return True
