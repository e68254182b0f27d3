"""Answer extraction and checking (mixsel.answers): golden cases."""

from __future__ import annotations

import pytest

from mixsel.answers import (
    checkers_for,
    extract_answer,
    final_answer,
    get_checker,
    is_correct,
    normalize_answer,
    reference_answer,
    states_answer,
)


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


# ---- final answers and the built-in checkers ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("working\n#### x = -3/4\nmore", "x = -3/4"),
        ("so $\\boxed{\\frac{n(n-3)}{2}}$.", "\\frac{n(n-3)}{2}"),
        ("first \\boxed{1} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("line one\n  the end  \n\n", "the end"),
        ("", ""),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_reference_answer_reads_markers_only():
    assert reference_answer("a\n#### 42") == "42"
    assert reference_answer("\\boxed{7}") == "7"
    assert reference_answer("\\boxed{unbalanced") is None
    assert reference_answer("no marker, 42") is None


def test_states_answer_needs_a_marker_with_an_answer():
    assert states_answer("so 6 * 7 = 42\n#### 42")
    assert states_answer("the answer is \\boxed{x^2}")
    assert not states_answer("so the answer is 42")
    assert not states_answer("#### \nthen 42")  # an empty answer line states nothing


SYMPY_CASES = [
    ("n(n-3)/2", "(n^2-3n)/2", True),
    ("#### x = -3/4", "-0.75", True),
    ("\\frac{1}{2}", "0.5", True),
    ("The answer is $\\boxed{\\dfrac{n(n-3)}{2}}$.", "n(n-3)/2", True),
    ("\\left(\\frac{1}{2}\\right)^{2}", "1/4", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("3\\pi", "3 pi", True),
    ("5\\text{ cm}", "5", True),
    ("1,000", "1000", True),
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1,2)", False),
    ("0.333333", "1/3", True),  # within the default tolerance 1e-6
    ("0.33", "1/3", False),
    ("n(n+3)/2", "(n^2-3n)/2", False),
    ("\\alpha", "1", False),  # unsupported LaTeX: unreadable, so wrong
    ("", "1", False),
]


@pytest.mark.parametrize(("prediction", "reference", "ok"), SYMPY_CASES)
def test_sympy_checker(prediction, reference, ok):
    pytest.importorskip("sympy")
    assert get_checker("sympy")(prediction, reference) is ok


@pytest.mark.parametrize("hostile", ["__import__('os').system('echo hi')", "x.real", "9^9^9^9", "10000!", "a" * 300])
def test_sympy_checker_refuses_unsafe_or_huge_input(hostile):
    pytest.importorskip("sympy")
    from mixsel.answers.symbolic import parse_answer

    assert parse_answer(hostile) is None
    assert get_checker("sympy")(hostile, "1") is False


@pytest.mark.parametrize(
    ("prediction", "reference", "ok"),
    [
        ("#### 1,234", "1234", True),
        ("working\n#### 0.75", "3/4", True),
        ("#### 75%", "75", True),
        ("#### 0.7500001", "0.75", True),
        ("#### 0.76", "0.75", False),
        ("x = 3", "3", True),
        ("no number", "3", False),
    ],
)
def test_numeric_checker(prediction, reference, ok):
    assert get_checker("numeric")(prediction, reference) is ok
    assert get_checker("numeric", tolerance=0.1)("#### 0.76", "0.75") is True


@pytest.mark.parametrize(
    ("prediction", "reference", "ok"),
    [
        ("#### Paris", "Paris", True),
        ("#### paris", "Paris", False),  # case-sensitive
        ("so\n####   New   York.", "New York", True),
        ("#### $1,000.0$", "1000", True),
        ("#### x=-3/4", "x = -3/4", False),  # a string, not an expression: use sympy
    ],
)
def test_exact_checker(prediction, reference, ok):
    assert get_checker("exact")(prediction, reference) is ok


@pytest.mark.parametrize(
    ("prediction", "reference", "ok"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", True),
        ("#### 12", "She pays 3 * 4 = 12 dollars.\n#### 12", True),  # a full GSM8K solution as the reference
        ("#### 13", "work\n#### 12", False),
        ("the result is 5 then 4", "4", True),
    ],
)
def test_gsm8k_checker(prediction, reference, ok):
    assert get_checker("gsm8k")(prediction, reference) is ok


def test_checker_paths_and_mappings():
    import _checkers

    custom = get_checker("_checkers:same_last_word")
    assert custom is _checkers.same_last_word
    assert custom("it is blue", "blue") and not custom("it is red", "blue")
    by_domain = checkers_for({"algebra": "sympy", "*": "exact"}, ["algebra", "geo", "trivia"])
    assert by_domain["geo"] is by_domain["trivia"]
    assert by_domain["algebra"]("#### 0.5", "\\frac{1}{2}") and not by_domain["geo"]("#### 0.5", "1/2")
    assert checkers_for("numeric", ["a"])["a"]("#### 2", "2.0")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fuzzy", r"eval.answer_checker='fuzzy' is neither a built-in checker \(gsm8k, exact, numeric, sympy\)"),
        ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz'.*PYTHONPATH"),
        ("_checkers:missing", r"module '_checkers' has no function 'missing'; define missing\(prediction"),
        ({"algebr": "sympy"}, r"names unknown domain\(s\) \['algebr'\]; the data has \['algebra'\]"),
    ],
)
def test_checker_errors_are_one_line_with_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        checkers_for(spec, ["algebra"])
