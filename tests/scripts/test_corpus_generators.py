"""The corpus generators in scripts/corpus/: answers recomputed independently, working checked."""

from __future__ import annotations

import ast
import operator
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/corpus is not installed

from corpus import arithmetic, chemistry
from corpus.arithmetic import generate_problems

from mixsel.answers import extract_answer, is_correct, normalize_answer

# An independent oracle per template: the answer from the sampled values, written from the prompts.
ORACLE = {
    "shopping_total": lambda v: v["a"] * v["x"] + v["b"] * v["y"],
    "shopping_change": lambda v: v["bill"] - v["a"] * v["x"],
    "discount": lambda v: v["price"] - v["price"] * v["pct"] / 100,
    "distance": lambda v: v["s1"] * v["h1"] + v["s2"] * v["h2"],
    "work_rate": lambda v: v["r"] * v["h"] * v["d"],
    "ages_sum": lambda v: (v["x"] + v["y"]) + (v["k"] * v["x"] + v["y"]),
    "ages_diff": lambda v: v["x"] + v["d"] + v["y"],
    "sharing": lambda v: (v["n"] - v["e"]) / v["k"],
    "savings": lambda v: v["s"] * v["w"] - v["t"],
    "farm_revenue": lambda v: v["c"] * v["m"] * 7 * v["p"],
    "fraction_class": lambda v: v["n"] - v["n"] / v["k"],
    "percent_test": lambda v: v["n"] * (100 - v["pct"]) / 100,
    "reading": lambda v: (v["total"] - v["r"]) / v["p"],
    "recipe": lambda v: v["cups"] * v["want"] / v["batch"],
    "legs": lambda v: 4 * v["d"] + 2 * v["c"],
    "garden": lambda v: v["r"] * v["k"] - v["m"],
    "minutes_to_hours": lambda v: v["x"] * v["d"] / 60,
    "pooling": lambda v: (v["x"] + v["y"] + v["z"] - v["t"]) / 3,
    "overtime": lambda v: 40 * v["w"] + 1.5 * v["w"] * v["o"],
    "boxes": lambda v: v["n"] // v["k"],
    "temperature": lambda v: v["t"] + v["a"] * v["h"] - v["b"],
    "bus": lambda v: v["p"] - v["off1"] + v["on1"] - v["off2"] + v["on2"],
    "rectangle": lambda v: 2 * (v["w"] + v["h"]) * v["c"],
    "tickets": lambda v: v["na"] * v["pa"] + v["nc"] * v["pc"] + v["snack"],
    "half_then": lambda v: v["n"] / 2 + v["more"],
}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
# "a op b [op c ...] = r" with integers or decimals, as the responses write their working.
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?(?: [-+*/] -?\d+(?:\.\d+)?)+) = (-?\d+(?:\.\d+)?)")


def _evaluate(expr: str) -> Decimal:
    def ev(node: ast.AST) -> Decimal:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant):
            return Decimal(str(node.value))
        raise AssertionError(f"unexpected {ast.dump(node)} in {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def _check_equations(response: str, rounded: bool = False) -> int:
    """Assert every ``a op b = c`` in ``response`` holds; return how many there were.

    With ``rounded``, ``c`` may be the exact value rounded half-up to ``c``'s decimal places.
    """
    found = _EQUATION.findall(response)
    for expr, result in found:
        value, shown = _evaluate(expr), Decimal(result)
        if rounded:
            value = value.quantize(Decimal(1).scaleb(shown.as_tuple().exponent), rounding=ROUND_HALF_UP)
        assert value == shown, f"{expr} = {result} is wrong in:\n{response}"
    return len(found)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(600, seed=3)


def test_every_template_has_an_oracle_and_appears(problems):
    assert set(ORACLE) == set(arithmetic.TEMPLATES)
    assert {p["template"] for p in problems} == set(arithmetic.TEMPLATES)


def test_answers_match_independent_oracle(problems):
    for p in problems:
        expected = ORACLE[p["template"]](p["values"])
        assert expected == int(expected) and expected >= 0, p
        assert p["answer"] == str(int(expected)), p


def test_working_is_arithmetically_correct_and_ends_with_answer(problems):
    for p in problems:
        assert _check_equations(p["response"]) >= 2, p["response"]
        assert p["response"].splitlines()[-1] == f"#### {p['answer']}"
        assert extract_answer(p["response"]) == p["answer"]
        assert is_correct(p["response"], p["answer"])
        assert p["answer"] in p["response"].splitlines()[-2]  # the last step computes the answer


def test_every_number_in_the_question_is_used_in_the_working(problems):
    for p in problems:
        if p["template"] == "boxes":  # the remainder check uses n; covered by the oracle instead
            continue
        working = p["response"]
        for number in re.findall(
            r"\d+", p["prompt"].replace("1.5 times", "").replace(" 1/", " ").replace("At 6 a.m.", "")
        ):
            assert re.search(rf"(?<![\d.]){number}(?![\d])", working), (number, p["prompt"], working)


def test_generation_is_deterministic_unique_and_prefix_stable():
    a, b = generate_problems(120, seed=7), generate_problems(120, seed=7)
    assert a == b
    assert generate_problems(40, seed=7) == a[:40]
    assert generate_problems(40, seed=8) != a[:40]
    assert len({p["prompt"] for p in a}) == 120
    assert generate_problems(0, seed=1) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_problems(-1)


# --------------------------------------------------------------------- chemistry generator

# Hand-computed molar masses from the IUPAC abridged atomic weights.
GOLDEN_MASSES = {
    "H2O": "18.015",  # 2 * 1.008 + 15.999
    "NaCl": "58.440",  # 22.990 + 35.45
    "CO2": "44.009",  # 12.011 + 2 * 15.999
    "H2SO4": "98.072",  # 2.016 + 32.06 + 63.996
    "C6H12O6": "180.156",  # 72.066 + 12.096 + 95.994
    "CaCO3": "100.086",  # 40.078 + 12.011 + 47.997
    "Ca3(PO4)2": "310.174",  # 120.234 + 61.948 + 127.992
}


@pytest.mark.parametrize(("formula", "mass"), sorted(GOLDEN_MASSES.items()))
def test_molar_mass_golden(formula, mass):
    assert chemistry.molar_mass(formula) == Decimal(mass)


def test_parse_formula_golden_and_errors():
    assert chemistry.parse_formula("(NH4)2SO4") == {"N": 2, "H": 8, "S": 1, "O": 4}
    assert chemistry.parse_formula("CH3COOH") == {"C": 2, "H": 4, "O": 2}
    assert chemistry.parse_formula("Al2(SO4)3") == {"Al": 2, "S": 3, "O": 12}
    for bad in ("Xx2", "Ca(OH", "CaOH)2", "H2 O"):
        with pytest.raises(ValueError, match="formula"):
            chemistry.parse_formula(bad)


def _count_atoms(formula: str) -> dict[str, int]:
    """A second parser: expand innermost parentheses textually, then count element tokens."""
    inner = re.compile(r"\(([^()]*)\)(\d*)")
    while "(" in formula:
        formula = inner.sub(lambda m: m.group(1) * int(m.group(2) or 1), formula)
    counts: dict[str, int] = {}
    for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula):
        counts[el] = counts.get(el, 0) + int(n or 1)
    return counts


def test_second_parser_agrees_on_every_compound():
    for formula, _ in chemistry.COMPOUNDS:
        assert chemistry.parse_formula(formula) == _count_atoms(formula), formula


def test_reactions_are_balanced():
    for reactants, products in chemistry.REACTIONS:
        totals = []
        for side in (reactants, products):
            total: dict[str, int] = {}
            for coeff, formula in side:
                for el, n in _count_atoms(formula).items():
                    total[el] = total.get(el, 0) + coeff * n
            totals.append(total)
        assert totals[0] == totals[1], (reactants, products)


def test_element_table_spot_checks():
    assert chemistry.ELEMENTS["C"][:2] == (6, "carbon")
    assert chemistry.ELEMENTS["Au"][:2] == (79, "gold")
    assert chemistry.ELEMENTS["U"][:2] == (92, "uranium")
    assert chemistry.ELEMENTS["Fe"][2] == "55.845"
    for sym, mass in chemistry.ISOTOPES:
        assert mass >= chemistry.ELEMENTS[sym][0], sym


def _mass(formula: str) -> Decimal:
    return sum((n * Decimal(chemistry.ELEMENTS[el][2]) for el, n in _count_atoms(formula).items()), Decimal(0))


def _round(x: Decimal, places: int) -> str:
    return normalize_answer(str(x.quantize(Decimal(10) ** -places, rounding=ROUND_HALF_UP)))


def test_chemistry_answers_recomputed():
    qs = chemistry.generate_questions(400, seed=5)
    assert {q["template"] for q in qs} == set(chemistry.TEMPLATES)
    for q in qs:
        v, t = q["values"], q["template"]
        if t == "molar_mass":
            expected = _round(_mass(v["formula"]), 2)
        elif t == "mass_from_moles":
            expected = _round(Decimal(v["moles"]) * _mass(v["formula"]), 2)
        elif t == "moles_from_mass":
            expected = _round(Decimal(v["grams"]) / _mass(v["formula"]), 2)
        elif t == "percent_mass":
            el = v["element"]
            part = _count_atoms(v["formula"])[el] * Decimal(chemistry.ELEMENTS[el][2])
            expected = _round(100 * part / _mass(v["formula"]), 1)
        elif t == "atom_count":
            expected = str(_count_atoms(v["formula"])[v["element"]])
        elif t == "total_atoms":
            expected = str(sum(_count_atoms(v["formula"]).values()))
        elif t == "stoichiometry":
            coeffs = {}
            for term in re.split(r" \+ | -> ", v["reaction"]):
                c, _, f = term.rpartition(" ")
                coeffs[f] = int(c or 1)
            given = int(re.search(r"when (\d+) mol", q["prompt"]).group(1))
            expected = str(given * coeffs[v["wanted"]] // coeffs[v["given"]])
        elif t == "neutrons":
            expected = str(v["mass_number"] - chemistry.ELEMENTS[v["symbol"]][0])
        elif t == "atomic_number":
            expected = str(chemistry.ELEMENTS[v["symbol"]][0])
        else:
            expected = v["symbol"]
        assert q["answer"] == expected, q
        assert extract_answer(q["response"]) == expected
        assert is_correct(q["response"], q["answer"])
        _check_equations(q["response"], rounded=True)


def test_chemistry_generation_deterministic_and_bounded():
    assert chemistry.generate_questions(50, seed=1) == chemistry.generate_questions(50, seed=1)
    assert len({q["prompt"] for q in chemistry.generate_questions(300, seed=2)}) == 300
    with pytest.raises(ValueError, match="n must be in"):
        chemistry.generate_questions(10**6)
