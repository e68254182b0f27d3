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


def one_argument(prediction: str) -> bool:
    """The wrong signature: a checker is called with (prediction, reference)."""
    return bool(prediction)


def raises(prediction: str, reference: str) -> bool:
    """A checker that fails on any input."""
    raise RuntimeError("cannot parse " + prediction[:10])


def returns_text(prediction: str, reference: str) -> str:
    """The wrong return type: a string is always truthy."""
    return "yes"


def only_on_probe(prediction: str, reference: str) -> bool:
    """Fine on the start-of-run sample pair, raises on anything else (as on a model's generation)."""
    from mixsel.answers import PROBE_PAIR

    if (prediction, reference) != PROBE_PAIR:
        raise ValueError("unreadable generation")
    return True
