"""Answer extraction and checking (mixsel.answers): golden cases."""

from __future__ import annotations

import pytest

from mixsel.answers import extract_answer, is_correct, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("#### $56.00", "56"),
        ("#### 2.50 dollars", "2.5"),
        ("#### -7", "-7"),
        ("#### 18\nQuestion: Ann has 4 apples.\n#### 4", "18"),  # the first answer counts
        ("3 + 4 = 7 and then 7 * 2 = 14.", "14"),  # no marker: last number
        ("The answer is 0.25.", "0.25"),
        ("so 9 remain\n####\n3 more", "9"),  # empty marker: last number before it
        ("#### Na", "Na"),
        ("#### the answer is 42", "42"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer_golden(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("generated", "answer", "ok"),
    [
        ("2 + 2 = 4\n#### 4", "4", True),
        ("#### 4.0", "4", True),
        ("#### 1,000", "1000", True),
        ("#### 5", "4", False),
        ("the result is 4 then 5", "4", False),  # last number is 5
        ("the result is 5 then 4", "4", True),
        ("#### Na", "Na", True),
        ("#### NA", "Na", False),
        ("nothing", "4", False),
        ("#### 1.60", "1.6", True),
    ],
)
def test_is_correct_golden(generated, answer, ok):
    assert is_correct(generated, answer) is ok


def test_normalize_answer_golden():
    assert normalize_answer("$1,200.50") == "1200.5"
    assert normalize_answer(" 42. ") == "42"
    assert normalize_answer("-0") == "0"
    assert normalize_answer("+3") == "3"
    assert normalize_answer("Fe") == "Fe"
