"""Checking generated answers against reference answers (exact-match evaluation).

The GSM8K convention (Cobbe et al., 2021, arXiv:2110.14168): a solution ends with a line
``#### <answer>``; :func:`extract_answer` reads the final answer back from a generated text and
:func:`is_correct` compares it with the reference, numbers by value.

Example:
    >>> is_correct("... so she pays 12 dollars.\\n#### 12", "12")
    True
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_answer", "is_correct", "normalize_answer"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_answer(text: str) -> str:
    """Canonical form of a final answer: numbers lose ``$``, commas, ``+`` and trailing zeros.

    ``"$1,200.50"`` -> ``"1200.5"``, ``"42.0"`` -> ``"42"``, ``"-0"`` -> ``"0"``; non-numeric
    answers (a chemical symbol such as ``"Na"``) are only stripped of spaces and a final period.
    """
    s = text.strip().rstrip(".").strip()
    num = s.replace(",", "").replace("$", "").lstrip("+").strip()
    try:
        d = Decimal(num)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer in a (generated) solution, normalised by :func:`normalize_answer`.

    The first number after the first ``####`` on that line is the answer, as in GSM8K (or, if that
    line has no number, its first word, e.g. a chemical symbol); a model that goes on generating after
    its answer line is judged on that first answer. Without a
    ``####`` marker (or with an empty one) the last number in the text is taken ("flexible" match).

    Returns:
        The normalised answer, or ``None`` if the text holds neither a marker nor a number.
    """
    marker = text.find("####")
    if marker >= 0:
        line = text[marker + 4 :].split("\n", 1)[0].strip()
        if line:
            number = _NUMBER.search(line.replace("$", ""))
            return normalize_answer(number.group(0) if number else line.split()[0])
        text = text[:marker]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return normalize_answer(numbers[-1])


def is_correct(generated_text: str, answer: str) -> bool:
    """Exact-match correctness of a generated solution against the reference ``answer``.

    Both sides are normalised; numeric answers compare by value (``"12.0"`` matches ``"12"``),
    other answers compare as case-sensitive strings (``"Na"`` is not ``"NA"``).
    """
    pred = extract_answer(generated_text)
    if pred is None:
        return False
    ref = normalize_answer(answer)
    try:
        return Decimal(pred) == Decimal(ref)
    except InvalidOperation:
        return pred == ref
