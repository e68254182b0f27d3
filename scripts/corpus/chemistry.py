"""Chemistry questions with checkable answers: element facts, formulas, molar masses, stoichiometry.

The embedded corpus's ``chemistry`` domain is built by :func:`generate_questions`. Answers are
computed exactly with :class:`decimal.Decimal` from the IUPAC abridged standard atomic weights
(IUPAC CIAAW, "Standard atomic weights of the elements 2021", abridged to five significant figures,
the conventional value for elements with an interval), and rounded half-up. Responses show the
working and end, like the ``arithmetic`` domain, with a line ``#### <answer>``, so the same
:func:`mixsel.answers.is_correct` scores both. Like ``arithmetic.py`` next to it, this module only
builds the shipped corpus and is not part of the installed package.

Example:
    >>> molar_mass("H2O")
    Decimal('18.015')
    >>> parse_formula("Ca(NO3)2")
    {'Ca': 1, 'N': 2, 'O': 6}
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from mixsel.answers import normalize_answer

__all__ = [
    "COMPOUNDS",
    "ELEMENTS",
    "ISOTOPES",
    "REACTIONS",
    "TEMPLATES",
    "generate_questions",
    "molar_mass",
    "parse_formula",
]

#: symbol -> (atomic number, English name, standard atomic weight as a decimal string).
ELEMENTS: dict[str, tuple[int, str, str]] = {
    "H": (1, "hydrogen", "1.008"), "He": (2, "helium", "4.0026"), "Li": (3, "lithium", "6.94"),
    "Be": (4, "beryllium", "9.0122"), "B": (5, "boron", "10.81"), "C": (6, "carbon", "12.011"),
    "N": (7, "nitrogen", "14.007"), "O": (8, "oxygen", "15.999"), "F": (9, "fluorine", "18.998"),
    "Ne": (10, "neon", "20.180"), "Na": (11, "sodium", "22.990"), "Mg": (12, "magnesium", "24.305"),
    "Al": (13, "aluminium", "26.982"), "Si": (14, "silicon", "28.085"), "P": (15, "phosphorus", "30.974"),
    "S": (16, "sulfur", "32.06"), "Cl": (17, "chlorine", "35.45"), "Ar": (18, "argon", "39.95"),
    "K": (19, "potassium", "39.098"), "Ca": (20, "calcium", "40.078"), "Sc": (21, "scandium", "44.956"),
    "Ti": (22, "titanium", "47.867"), "V": (23, "vanadium", "50.942"), "Cr": (24, "chromium", "51.996"),
    "Mn": (25, "manganese", "54.938"), "Fe": (26, "iron", "55.845"), "Co": (27, "cobalt", "58.933"),
    "Ni": (28, "nickel", "58.693"), "Cu": (29, "copper", "63.546"), "Zn": (30, "zinc", "65.38"),
    "Ga": (31, "gallium", "69.723"), "Ge": (32, "germanium", "72.630"), "As": (33, "arsenic", "74.922"),
    "Se": (34, "selenium", "78.971"), "Br": (35, "bromine", "79.904"), "Kr": (36, "krypton", "83.798"),
    "Sr": (38, "strontium", "87.62"), "Ag": (47, "silver", "107.87"), "Sn": (50, "tin", "118.71"),
    "I": (53, "iodine", "126.90"), "Xe": (54, "xenon", "131.29"), "Ba": (56, "barium", "137.33"),
    "W": (74, "tungsten", "183.84"), "Pt": (78, "platinum", "195.08"), "Au": (79, "gold", "196.97"),
    "Hg": (80, "mercury", "200.59"), "Pb": (82, "lead", "207.2"), "U": (92, "uranium", "238.03"),
}  # fmt: skip

#: Real nuclides (symbol, mass number) for neutron-count questions.
ISOTOPES: tuple[tuple[str, int], ...] = (
    ("H", 1), ("H", 2), ("H", 3), ("He", 4), ("Li", 7), ("C", 12), ("C", 13), ("C", 14), ("N", 14),
    ("N", 15), ("O", 16), ("O", 18), ("F", 19), ("Na", 23), ("Mg", 24), ("Al", 27), ("Si", 28),
    ("P", 31), ("P", 32), ("S", 32), ("Cl", 35), ("Cl", 37), ("K", 39), ("K", 40), ("Ca", 40),
    ("Fe", 56), ("Co", 60), ("Cu", 63), ("Cu", 65), ("Zn", 64), ("Br", 79), ("Br", 81), ("Sr", 90),
    ("Ag", 107), ("Sn", 120), ("I", 127), ("I", 131), ("Ba", 138), ("Au", 197), ("Hg", 202),
    ("Pb", 206), ("Pb", 208), ("U", 235), ("U", 238),
)  # fmt: skip

#: (formula, name) of common compounds.
COMPOUNDS: tuple[tuple[str, str], ...] = (
    ("H2O", "water"), ("CO2", "carbon dioxide"), ("CO", "carbon monoxide"), ("CH4", "methane"),
    ("NH3", "ammonia"), ("NaCl", "sodium chloride"), ("C6H12O6", "glucose"), ("H2SO4", "sulfuric acid"),
    ("HNO3", "nitric acid"), ("HCl", "hydrogen chloride"), ("CaCO3", "calcium carbonate"),
    ("NaOH", "sodium hydroxide"), ("KMnO4", "potassium permanganate"), ("C2H5OH", "ethanol"),
    ("CH3COOH", "acetic acid"), ("C12H22O11", "sucrose"), ("Ca(OH)2", "calcium hydroxide"),
    ("MgO", "magnesium oxide"), ("Fe2O3", "iron(III) oxide"), ("Al2O3", "aluminium oxide"),
    ("CuSO4", "copper(II) sulfate"), ("NaHCO3", "sodium bicarbonate"), ("KNO3", "potassium nitrate"),
    ("NH4NO3", "ammonium nitrate"), ("Ca(NO3)2", "calcium nitrate"), ("(NH4)2SO4", "ammonium sulfate"),
    ("C3H8", "propane"), ("C4H10", "butane"), ("C6H6", "benzene"), ("H2O2", "hydrogen peroxide"),
    ("O3", "ozone"), ("SiO2", "silicon dioxide"), ("Na2CO3", "sodium carbonate"),
    ("KCl", "potassium chloride"), ("AgNO3", "silver nitrate"), ("BaSO4", "barium sulfate"),
    ("ZnO", "zinc oxide"), ("H3PO4", "phosphoric acid"), ("Ca3(PO4)2", "calcium phosphate"),
    ("SO2", "sulfur dioxide"), ("NO2", "nitrogen dioxide"), ("Pb(NO3)2", "lead(II) nitrate"),
    ("Al2(SO4)3", "aluminium sulfate"), ("MgCl2", "magnesium chloride"), ("KI", "potassium iodide"),
    ("CO(NH2)2", "urea"), ("CH3COCH3", "acetone"), ("Na2SO4", "sodium sulfate"),
    ("CaCl2", "calcium chloride"), ("LiOH", "lithium hydroxide"), ("K2Cr2O7", "potassium dichromate"),
    ("FeSO4", "iron(II) sulfate"), ("CH3OH", "methanol"), ("N2O", "nitrous oxide"),
    ("H2S", "hydrogen sulfide"), ("NaNO3", "sodium nitrate"), ("CaO", "calcium oxide"),
    ("Mg(OH)2", "magnesium hydroxide"), ("C9H8O4", "aspirin"), ("C8H10N4O2", "caffeine"),
    ("C2H4", "ethylene"), ("C2H2", "acetylene"), ("KClO3", "potassium chlorate"), ("ZnCl2", "zinc chloride"),
)  # fmt: skip

#: Balanced reactions as (reactants, products), each a tuple of (coefficient, formula).
REACTIONS: tuple[tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]], ...] = (
    (((2, "H2"), (1, "O2")), ((2, "H2O"),)),
    (((1, "N2"), (3, "H2")), ((2, "NH3"),)),
    (((1, "CH4"), (2, "O2")), ((1, "CO2"), (2, "H2O"))),
    (((1, "C3H8"), (5, "O2")), ((3, "CO2"), (4, "H2O"))),
    (((2, "C4H10"), (13, "O2")), ((8, "CO2"), (10, "H2O"))),
    (((2, "Na"), (1, "Cl2")), ((2, "NaCl"),)),
    (((1, "CaCO3"),), ((1, "CaO"), (1, "CO2"))),
    (((2, "KClO3"),), ((2, "KCl"), (3, "O2"))),
    (((4, "Fe"), (3, "O2")), ((2, "Fe2O3"),)),
    (((2, "Al"), (3, "Cl2")), ((2, "AlCl3"),)),
    (((1, "Zn"), (2, "HCl")), ((1, "ZnCl2"), (1, "H2"))),
    (((1, "Mg"), (2, "HCl")), ((1, "MgCl2"), (1, "H2"))),
    (((1, "C6H12O6"), (6, "O2")), ((6, "CO2"), (6, "H2O"))),
    (((2, "H2O2"),), ((2, "H2O"), (1, "O2"))),
    (((2, "SO2"), (1, "O2")), ((2, "SO3"),)),
    (((1, "C2H5OH"), (3, "O2")), ((2, "CO2"), (3, "H2O"))),
    (((4, "Al"), (3, "O2")), ((2, "Al2O3"),)),
    (((1, "NaOH"), (1, "HCl")), ((1, "NaCl"), (1, "H2O"))),
    (((2, "NaOH"), (1, "H2SO4")), ((1, "Na2SO4"), (2, "H2O"))),
    (((1, "Fe2O3"), (3, "CO")), ((2, "Fe"), (3, "CO2"))),
    (((1, "CaO"), (1, "H2O")), ((1, "Ca(OH)2"),)),
    (((2, "Mg"), (1, "O2")), ((2, "MgO"),)),
    (((1, "N2"), (2, "O2")), ((2, "NO2"),)),
    (((2, "C2H2"), (5, "O2")), ((4, "CO2"), (2, "H2O"))),
)  # fmt: skip

_TOKEN = re.compile(r"([A-Z][a-z]?|\(|\))(\d*)")


def parse_formula(formula: str) -> dict[str, int]:
    """Atom counts of a chemical formula with optional parenthesised groups, e.g. ``"Ca3(PO4)2"``.

    Raises:
        ValueError: on an unknown element symbol, unbalanced parentheses or stray characters.
    """
    stack: list[dict[str, int]] = [{}]
    pos = 0
    while pos < len(formula):
        m = _TOKEN.match(formula, pos)
        if m is None:
            raise ValueError(f"formula {formula!r}: unexpected character at position {pos}")
        tok, num = m.group(1), int(m.group(2) or 1)
        if tok == "(":
            if m.group(2):
                raise ValueError(f"formula {formula!r}: a count cannot follow '('")
            stack.append({})
        elif tok == ")":
            if len(stack) == 1:
                raise ValueError(f"formula {formula!r}: unbalanced ')'")
            group = stack.pop()
            for el, c in group.items():
                stack[-1][el] = stack[-1].get(el, 0) + c * num
        else:
            if tok not in ELEMENTS:
                raise ValueError(f"formula {formula!r}: unknown element {tok!r}")
            stack[-1][tok] = stack[-1].get(tok, 0) + num
        pos = m.end()
    if len(stack) != 1:
        raise ValueError(f"formula {formula!r}: unbalanced '('")
    return stack[0]


def molar_mass(formula: str) -> Decimal:
    """Exact molar mass in g/mol: the sum of count * standard atomic weight (no rounding)."""
    return sum(
        (c * Decimal(ELEMENTS[el][2]) for el, c in parse_formula(formula).items()),
        start=Decimal(0),
    )


def _round(x: Decimal, places: int) -> str:
    return str(x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def _mass_lines(formula: str) -> list[str]:
    counts = parse_formula(formula)
    lines = [f"{el}: {c} * {ELEMENTS[el][2]} = {c * Decimal(ELEMENTS[el][2])}" for el, c in counts.items()]
    terms = " + ".join(str(c * Decimal(ELEMENTS[el][2])) for el, c in counts.items())
    lines.append(f"Molar mass = {terms} = {molar_mass(formula)} g/mol.")
    return lines


Question = tuple[str, list[str], str, dict[str, Any]]


def _element_symbol(rng: random.Random) -> Question:
    sym = rng.choice(sorted(ELEMENTS))
    z, name, _ = ELEMENTS[sym]
    prompt = f"What is the chemical symbol of {name}?"
    return prompt, [f"{name.capitalize()} (atomic number {z}) has the symbol {sym}."], sym, {"symbol": sym}


def _atomic_number(rng: random.Random) -> Question:
    sym = rng.choice(sorted(ELEMENTS))
    z, name, _ = ELEMENTS[sym]
    prompt = f"What is the atomic number of {name} ({sym})?"
    lines = [f"An atom of {name} has {z} protons in its nucleus, so its atomic number is {z}."]
    return prompt, lines, str(z), {"symbol": sym}


def _neutrons(rng: random.Random) -> Question:
    sym, a = rng.choice(ISOTOPES)
    z, name, _ = ELEMENTS[sym]
    prompt = f"How many neutrons are in the nucleus of an atom of {name}-{a}?"
    lines = [
        f"{name.capitalize()} has atomic number {z}, so it has {z} protons.",
        f"Neutrons = mass number - protons = {a} - {z} = {a - z}.",
    ]
    return prompt, lines, str(a - z), {"symbol": sym, "mass_number": a}


def _atom_count(rng: random.Random) -> Question:
    formula, name = rng.choice(COMPOUNDS)
    counts = parse_formula(formula)
    el = rng.choice(sorted(counts))
    prompt = f"How many {ELEMENTS[el][1]} atoms are in one formula unit of {name}, {formula}?"
    lines = [f"{formula} contains " + ", ".join(f"{c} {e}" for e, c in counts.items()) + "."]
    return prompt, lines, str(counts[el]), {"formula": formula, "element": el}


def _total_atoms(rng: random.Random) -> Question:
    formula, name = rng.choice(COMPOUNDS)
    counts = parse_formula(formula)
    total = sum(counts.values())
    prompt = f"How many atoms in total are in one formula unit of {name}, {formula}?"
    parts = " + ".join(str(c) for c in counts.values())
    lines = [f"Counting each element of {formula}: {parts} = {total} atoms."]
    return prompt, lines, str(total), {"formula": formula}


def _molar_mass_q(rng: random.Random) -> Question:
    formula, name = rng.choice(COMPOUNDS)
    m = molar_mass(formula)
    prompt = f"What is the molar mass of {name} ({formula}) in g/mol? Round to two decimal places."
    ans = _round(m, 2)
    return (
        prompt,
        [*_mass_lines(formula), f"Rounded to two decimal places: {ans}."],
        ans,
        {"formula": formula},
    )


_MOLES = ("0.1", "0.25", "0.5", "1.5", "2", "2.5", "3", "4", "5", "10")


def _mass_from_moles(rng: random.Random) -> Question:
    formula, name = rng.choice(COMPOUNDS)
    n = Decimal(rng.choice(_MOLES))
    m = molar_mass(formula)
    ans = _round(n * m, 2)
    prompt = f"What is the mass, in grams, of {n} mol of {name} ({formula})? Round to two decimal places."
    lines = [*_mass_lines(formula), f"Mass = {n} * {m} = {n * m} g, or {ans} g rounded."]
    return prompt, lines, ans, {"formula": formula, "moles": str(n)}


def _moles_from_mass(rng: random.Random) -> Question:
    formula, name = rng.choice(COMPOUNDS)
    grams = Decimal(rng.randint(1, 500))
    m = molar_mass(formula)
    ans = _round(grams / m, 2)
    prompt = f"How many moles are in {grams} g of {name} ({formula})? Round to two decimal places."
    lines = [*_mass_lines(formula), f"Moles = {grams} / {m} = {ans} mol, rounded to two decimal places."]
    return prompt, lines, ans, {"formula": formula, "grams": str(grams)}


def _percent_mass(rng: random.Random) -> Question:
    formula, name = rng.choice([c for c in COMPOUNDS if len(parse_formula(c[0])) > 1])
    counts = parse_formula(formula)
    el = rng.choice(sorted(counts))
    m = molar_mass(formula)
    part = counts[el] * Decimal(ELEMENTS[el][2])
    ans = _round(100 * part / m, 1)
    prompt = f"What is the percent by mass of {ELEMENTS[el][1]} in {name} ({formula})? Round to one decimal place."
    lines = [
        *_mass_lines(formula),
        f"{ELEMENTS[el][1].capitalize()} contributes {counts[el]} * {ELEMENTS[el][2]} = {part} g/mol.",
        f"Percent = 100 * {part} / {m} = {ans}%.",
    ]
    return prompt, lines, ans, {"formula": formula, "element": el}


def _equation(reaction: tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]) -> str:
    def side(terms: tuple[tuple[int, str], ...]) -> str:
        return " + ".join(f"{c} {f}" if c > 1 else f for c, f in terms)

    return f"{side(reaction[0])} -> {side(reaction[1])}"


def _stoichiometry(rng: random.Random) -> Question:
    reaction = rng.choice(REACTIONS)
    reactants, products = reaction
    c_in, given = rng.choice(reactants)
    c_out, wanted = rng.choice([t for t in (*reactants, *products) if t[1] != given])
    k = rng.randint(1, 6)
    n_given = c_in * k
    n_wanted = c_out * k
    verb = "are produced" if (c_out, wanted) in products else "are consumed"
    prompt = (
        f"In the balanced reaction {_equation(reaction)}, how many moles of {wanted} {verb} "
        f"when {n_given} mol of {given} react completely?"
    )
    lines = [
        f"The mole ratio of {wanted} to {given} is {c_out} : {c_in}.",
        f"Moles of {wanted} = {n_given} * {c_out} / {c_in} = {n_wanted}.",
    ]
    return prompt, lines, str(n_wanted), {"reaction": _equation(reaction), "given": given, "wanted": wanted}


#: Template name -> generator of one question ``(prompt, solution lines, answer, values)``.
TEMPLATES: dict[str, Callable[[random.Random], Question]] = {
    "element_symbol": _element_symbol,
    "atomic_number": _atomic_number,
    "neutrons": _neutrons,
    "atom_count": _atom_count,
    "total_atoms": _total_atoms,
    "molar_mass": _molar_mass_q,
    "mass_from_moles": _mass_from_moles,
    "moles_from_mass": _moles_from_mass,
    "percent_mass": _percent_mass,
    "stoichiometry": _stoichiometry,
}


def generate_questions(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``n`` distinct chemistry questions, deterministically from ``seed``.

    Args:
        n: Number of questions (>= 0). The pool of distinct questions is finite (tens of
            thousands); asking for more than about 5,000 raises.
        seed: Seed of the private ``random.Random``.

    Returns:
        Dicts with ``prompt``, ``response`` (working, last line ``#### <answer>``), ``answer``
        (canonical string, see :func:`mixsel.answers.normalize_answer`: a number such as
        ``"1.6"`` where the response shows ``1.60``, or an element symbol), ``template`` and
        ``values``.

    Raises:
        ValueError: if ``n`` is negative or larger than 5,000.
    """
    if not 0 <= n <= 5000:
        raise ValueError(f"n must be in [0, 5000], got {n}")
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    weights = {"element_symbol": 1, "atomic_number": 1, "neutrons": 1}  # small pools: drawn less often
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        name = rng.choices(names, weights=[weights.get(t, 3) for t in names])[0]
        prompt, lines, answer, values = TEMPLATES[name](rng)
        if prompt in seen:
            misses += 1
            if misses > 100 * (n + 10):
                raise ValueError(f"could not draw {n} distinct questions; ask for fewer")
            continue
        seen.add(prompt)
        out.append(
            {
                "prompt": prompt,
                "response": "\n".join([*lines, f"#### {answer}"]),
                "answer": normalize_answer(answer),
                "template": name,
                "values": values,
            }
        )
    return out
