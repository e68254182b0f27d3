"""Arithmetic word problems from templates, with checkable integer answers (GSM8K-style).

The embedded corpus's ``arithmetic`` domain is built by :func:`generate_problems`. Each problem is a
prompt/response pair in the format of GSM8K (Cobbe et al., 2021, "Training Verifiers to Solve Math
Word Problems"): the response reasons step by step, writing every computation as a plain equation
``a op b = c``, and ends with a line ``#### <answer>``, which :func:`mixsel.answers.extract_answer`
reads back and :func:`mixsel.answers.is_correct` scores after greedy generation.

This module builds the shipped corpus only (``scripts/build_corpus.py``); it is not part of the
installed package.

Example:
    >>> p = generate_problems(1, seed=0)[0]
    >>> p["response"].splitlines()[-1] == "#### " + p["answer"]
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["TEMPLATES", "generate_problems"]

_NAMES = (
    "Ava", "Ben", "Carlos", "Dana", "Elif", "Farah", "George", "Hana", "Ivan", "Jamal",
    "Keiko", "Liam", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara",
    "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Amara", "Bruno", "Chloe", "Diego",
    "Emma", "Finn", "Grace", "Hugo", "Isla", "Jonas", "Kira", "Leo", "Mina", "Noah",
)  # fmt: skip
_ITEMS = (
    ("apple", "apples"), ("notebook", "notebooks"), ("pencil", "pencils"), ("sandwich", "sandwiches"),
    ("ticket", "tickets"), ("candle", "candles"), ("shirt", "shirts"), ("book", "books"),
    ("muffin", "muffins"), ("plant", "plants"), ("toy car", "toy cars"),
    ("bottle of juice", "bottles of juice"),
    ("bag of rice", "bags of rice"), ("pair of socks", "pairs of socks"), ("cup of coffee", "cups of coffee"),
)  # fmt: skip
_CONTAINERS = (
    ("box", "boxes"),
    ("crate", "crates"),
    ("bag", "bags"),
    ("basket", "baskets"),
    ("tray", "trays"),
)
_GOODS = ("eggs", "oranges", "marbles", "cookies", "stickers", "beads", "cupcakes", "stamps")

Problem = tuple[str, list[str], int, dict[str, Any]]


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_NAMES, k)


def _shopping_total(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    (_, p1), (_, p2) = rng.sample(_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    x, y = rng.randint(2, 15), rng.randint(2, 15)
    total = a * x + b * y
    prompt = (
        f"{name} buys {a} {p1} that cost ${x} each and {b} {p2} that cost ${y} each. "
        f"How many dollars does {name} spend in all?"
    )
    lines = [
        f"The {p1} cost {a} * {x} = {a * x} dollars.",
        f"The {p2} cost {b} * {y} = {b * y} dollars.",
        f"In all {name} spends {a * x} + {b * y} = {total} dollars.",
    ]
    return prompt, lines, total, {"a": a, "x": x, "b": b, "y": y}


def _shopping_change(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    _, p = rng.choice(_ITEMS)
    a, x = rng.randint(2, 8), rng.randint(3, 12)
    cost = a * x
    bill = rng.choice([b for b in (20, 50, 100, 200) if b > cost])
    change = bill - cost
    prompt = (
        f"{name} pays for {a} {p} at ${x} each with a ${bill} bill. How much change, in dollars, does {name} get back?"
    )
    lines = [
        f"The {p} cost {a} * {x} = {cost} dollars.",
        f"The change is {bill} - {cost} = {change} dollars.",
    ]
    return prompt, lines, change, {"a": a, "x": x, "bill": bill}


def _discount(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    s, _ = rng.choice(_ITEMS)
    pct = rng.choice([10, 20, 25, 40, 50])
    price = rng.randint(2, 30) * (100 // _gcd(100, pct))
    off = price * pct // 100
    final = price - off
    prompt = (
        f"A {s} normally costs ${price}. {name} buys it during a sale with {pct}% off. "
        f"How many dollars does {name} pay?"
    )
    lines = [
        f"The discount is {price} * {pct} / 100 = {off} dollars.",
        f"{name} pays {price} - {off} = {final} dollars.",
    ]
    return prompt, lines, final, {"price": price, "pct": pct}


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _distance(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    s1, h1 = rng.randint(3, 12) * 5, rng.randint(2, 5)
    s2, h2 = rng.randint(2, 12) * 5, rng.randint(2, 4)
    d1, d2 = s1 * h1, s2 * h2
    prompt = (
        f"{name} drives at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for {h2} hours. "
        f"How many miles does {name} drive in total?"
    )
    lines = [
        f"First {name} drives {s1} * {h1} = {d1} miles.",
        f"Then {name} drives {s2} * {h2} = {d2} miles.",
        f"The total is {d1} + {d2} = {d1 + d2} miles.",
    ]
    return prompt, lines, d1 + d2, {"s1": s1, "h1": h1, "s2": s2, "h2": h2}


def _work_rate(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    good = rng.choice(_GOODS)
    r, h, d = rng.randint(3, 20), rng.randint(2, 8), rng.randint(2, 6)
    per_day = r * h
    prompt = (
        f"{name} packs {r} {good} per hour and works {h} hours a day. How many {good} does {name} pack in {d} days?"
    )
    lines = [
        f"Each day {name} packs {r} * {h} = {per_day} {good}.",
        f"In {d} days that is {per_day} * {d} = {per_day * d} {good}.",
    ]
    return prompt, lines, per_day * d, {"r": r, "h": h, "d": d}


def _ages_sum(rng: random.Random) -> Problem:
    a, b = _names(rng, 2)
    x, k, y = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    bx = k * x
    prompt = f"{a} is {x} years old. {b} is {k} times as old as {a}. What will the sum of their ages be in {y} years?"
    lines = [
        f"{b} is {k} * {x} = {bx} years old.",
        f"In {y} years {a} will be {x} + {y} = {x + y} and {b} will be {bx} + {y} = {bx + y}.",
        f"The sum is {x + y} + {bx + y} = {x + y + bx + y}.",
    ]
    return prompt, lines, x + bx + 2 * y, {"x": x, "k": k, "y": y}


def _ages_diff(rng: random.Random) -> Problem:
    a, b = _names(rng, 2)
    x, d, y = rng.randint(4, 30), rng.randint(2, 25), rng.randint(3, 20)
    prompt = f"{a} is {x} years old and {b} is {d} years older than {a}. How old will {b} be in {y} years?"
    lines = [
        f"{b} is {x} + {d} = {x + d} years old now.",
        f"In {y} years {b} will be {x + d} + {y} = {x + d + y} years old.",
    ]
    return prompt, lines, x + d + y, {"x": x, "d": d, "y": y}


def _sharing(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    good = rng.choice(_GOODS)
    k, each, e = rng.randint(2, 8), rng.randint(2, 12), rng.randint(1, 9)
    n = k * each + e
    prompt = (
        f"{name} has {n} {good}. {name} keeps {e} of them and shares the rest equally among {k} friends. "
        f"How many {good} does each friend get?"
    )
    lines = [
        f"{name} shares {n} - {e} = {n - e} {good}.",
        f"Each friend gets {n - e} / {k} = {each} {good}.",
    ]
    return prompt, lines, each, {"n": n, "e": e, "k": k}


def _savings(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    s, w = rng.randint(5, 30), rng.randint(4, 20)
    saved = s * w
    t = rng.randint(1, saved - 1)
    prompt = (
        f"{name} saves ${s} every week for {w} weeks and then spends ${t} on a gift. "
        f"How many dollars does {name} have left?"
    )
    lines = [
        f"{name} saves {s} * {w} = {saved} dollars.",
        f"After the gift {name} has {saved} - {t} = {saved - t} dollars.",
    ]
    return prompt, lines, saved - t, {"s": s, "w": w, "t": t}


def _farm_revenue(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    c, m, p = rng.randint(2, 12), rng.randint(3, 15), rng.randint(2, 5)
    daily = c * m
    weekly = daily * 7
    prompt = (
        f"{name} has {c} cows. Each cow gives {m} liters of milk a day, and {name} sells milk for ${p} "
        f"per liter. How many dollars does {name} earn from milk in a week?"
    )
    lines = [
        f"The cows give {c} * {m} = {daily} liters a day.",
        f"In a week that is {daily} * 7 = {weekly} liters.",
        f"{name} earns {weekly} * {p} = {weekly * p} dollars.",
    ]
    return prompt, lines, weekly * p, {"c": c, "m": m, "p": p}


def _fraction_class(rng: random.Random) -> Problem:
    k = rng.choice([2, 3, 4, 5])
    n = k * rng.randint(4, 12)
    part = n // k
    prompt = f"A class has {n} students and 1/{k} of them are boys. How many girls are in the class?"
    lines = [
        f"There are {n} / {k} = {part} boys.",
        f"So there are {n} - {part} = {n - part} girls.",
    ]
    return prompt, lines, n - part, {"n": n, "k": k}


def _percent_test(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    pct = rng.choice([20, 25, 40, 50, 60, 75, 80, 90])
    n = rng.randint(1, 10) * (100 // _gcd(100, pct))
    right = n * pct // 100
    prompt = (
        f"A test has {n} questions and {name} answers {pct}% of them correctly. "
        f"How many questions does {name} get wrong?"
    )
    lines = [
        f"{name} gets {n} * {pct} / 100 = {right} right.",
        f"So {name} gets {n} - {right} = {n - right} wrong.",
    ]
    return prompt, lines, n - right, {"n": n, "pct": pct}


def _reading(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    p, days, r = rng.randint(5, 40), rng.randint(2, 15), rng.randint(10, 120)
    total = r + p * days
    prompt = (
        f"A book has {total} pages. {name} has already read {r} pages and reads {p} pages every day. "
        f"How many more days does {name} need to finish the book?"
    )
    lines = [
        f"{name} has {total} - {r} = {total - r} pages left.",
        f"That takes {total - r} / {p} = {days} days.",
    ]
    return prompt, lines, days, {"total": total, "r": r, "p": p}


def _recipe(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    cups, batch, mult = rng.randint(2, 6), rng.randint(2, 4) * 6, rng.randint(2, 6)
    want = batch * mult
    prompt = (
        f"A recipe uses {cups} cups of flour to make {batch} cookies. {name} wants to make {want} cookies. "
        f"How many cups of flour does {name} need?"
    )
    lines = [
        f"{want} cookies is {want} / {batch} = {mult} batches.",
        f"{name} needs {mult} * {cups} = {mult * cups} cups of flour.",
    ]
    return prompt, lines, mult * cups, {"cups": cups, "batch": batch, "want": want}


def _legs(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    d, c = rng.randint(2, 12), rng.randint(2, 20)
    prompt = f"On {name}'s farm there are {d} dogs and {c} chickens. How many legs do the animals have altogether?"
    lines = [
        f"The dogs have {d} * 4 = {4 * d} legs.",
        f"The chickens have {c} * 2 = {2 * c} legs.",
        f"Altogether there are {4 * d} + {2 * c} = {4 * d + 2 * c} legs.",
    ]
    return prompt, lines, 4 * d + 2 * c, {"d": d, "c": c}


def _garden(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    r, k = rng.randint(3, 15), rng.randint(4, 20)
    planted = r * k
    m = rng.randint(2, planted // 3)
    prompt = (
        f"{name} plants {r} rows of tomatoes with {k} plants in each row. {m} of the plants do not survive. "
        f"How many tomato plants are left?"
    )
    lines = [
        f"{name} plants {r} * {k} = {planted} plants.",
        f"There are {planted} - {m} = {planted - m} plants left.",
    ]
    return prompt, lines, planted - m, {"r": r, "k": k, "m": m}


def _minutes_to_hours(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    x = rng.choice([15, 20, 30, 40, 45, 60, 90])
    d = rng.randint(2, 12) * (60 // _gcd(60, x))
    total = x * d
    prompt = f"{name} practices the piano for {x} minutes every day. How many hours does {name} practice in {d} days?"
    lines = [
        f"{name} practices {x} * {d} = {total} minutes.",
        f"That is {total} / 60 = {total // 60} hours.",
    ]
    return prompt, lines, total // 60, {"x": x, "d": d}


def _pooling(rng: random.Random) -> Problem:
    a, b, c = _names(rng, 3)
    x, y, z = rng.randint(10, 60), rng.randint(10, 60), rng.randint(10, 60)
    pool = x + y + z
    t = rng.randint(5, pool - 3)
    t += (pool - t) % 3  # the rest must split evenly in three
    rest = pool - t
    prompt = (
        f"{a} has ${x}, {b} has ${y} and {c} has ${z}. They put their money together, buy a game for ${t}, "
        f"and share the money that is left equally. How many dollars does each of them get?"
    )
    lines = [
        f"Together they have {x} + {y} + {z} = {pool} dollars.",
        f"After the game {pool} - {t} = {rest} dollars are left.",
        f"Each gets {rest} / 3 = {rest // 3} dollars.",
    ]
    return prompt, lines, rest // 3, {"x": x, "y": y, "z": z, "t": t}


def _overtime(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    w, o = rng.randint(5, 20) * 2, rng.randint(2, 12)
    base, extra_rate = 40 * w, w * 3 // 2
    prompt = (
        f"{name} earns ${w} an hour for the first 40 hours of a week and 1.5 times that rate for every hour "
        f"after 40. Last week {name} worked {40 + o} hours. How many dollars did {name} earn?"
    )
    lines = [
        f"For the first 40 hours {name} earns 40 * {w} = {base} dollars.",
        f"The overtime rate is {w} * 3 / 2 = {extra_rate} dollars an hour.",
        f"{name} worked {40 + o} - 40 = {o} overtime hours.",
        f"The overtime pays {o} * {extra_rate} = {o * extra_rate} dollars.",
        f"In total {name} earned {base} + {o * extra_rate} = {base + o * extra_rate} dollars.",
    ]
    return prompt, lines, base + o * extra_rate, {"w": w, "o": o}


def _boxes(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    good = rng.choice(_GOODS)
    cs, cp = rng.choice(_CONTAINERS)
    k, full = rng.randint(4, 24), rng.randint(3, 30)
    left = rng.randint(0, k - 1)
    n = k * full + left
    prompt = f"{name} has {n} {good} and puts {k} {good} in each {cs}. How many {cp} can {name} fill completely?"
    lines = [
        f"{k} * {full} = {k * full} and {n} - {k * full} = {left}, which is less than {k}.",
        f"So {name} can fill {full} {cp}.",
    ]
    return prompt, lines, full, {"n": n, "k": k}


def _temperature(rng: random.Random) -> Problem:
    t, a, h = rng.randint(0, 20), rng.randint(2, 5), rng.randint(2, 8)
    b = rng.randint(2, t + a * h)
    peak = t + a * h
    prompt = (
        f"At 6 a.m. the temperature is {t} degrees. It rises {a} degrees every hour for {h} hours "
        f"and then falls {b} degrees by evening. What is the temperature in the evening, in degrees?"
    )
    lines = [
        f"It rises {a} * {h} = {a * h} degrees.",
        f"The highest temperature is {t} + {a * h} = {peak} degrees.",
        f"In the evening it is {peak} - {b} = {peak - b} degrees.",
    ]
    return prompt, lines, peak - b, {"t": t, "a": a, "h": h, "b": b}


def _bus(rng: random.Random) -> Problem:
    p = rng.randint(10, 40)
    off1, on1 = rng.randint(2, p - 1), rng.randint(2, 15)
    after1 = p - off1 + on1
    off2, on2 = rng.randint(2, after1), rng.randint(2, 15)
    after2 = after1 - off2 + on2
    prompt = (
        f"A bus leaves the station with {p} passengers. "
        f"At the first stop {off1} people get off and {on1} get on. "
        f"At the second stop {off2} people get off and {on2} get on. How many passengers are on the bus now?"
    )
    lines = [
        f"After the first stop there are {p} - {off1} + {on1} = {after1} passengers.",
        f"After the second stop there are {after1} - {off2} + {on2} = {after2} passengers.",
    ]
    return prompt, lines, after2, {"p": p, "off1": off1, "on1": on1, "off2": off2, "on2": on2}


def _rectangle(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    w, h, c = rng.randint(3, 30), rng.randint(3, 30), rng.randint(2, 9)
    perim = 2 * w + 2 * h
    prompt = (
        f"{name}'s garden is a rectangle {w} meters long and {h} meters wide. Fencing costs ${c} per meter. "
        f"How many dollars does it cost to fence the whole garden?"
    )
    lines = [
        f"The perimeter is 2 * {w} + 2 * {h} = {perim} meters.",
        f"The fence costs {perim} * {c} = {perim * c} dollars.",
    ]
    return prompt, lines, perim * c, {"w": w, "h": h, "c": c}


def _tickets(rng: random.Random) -> Problem:
    name = _names(rng, 1)[0]
    na, nc = rng.randint(2, 6), rng.randint(2, 8)
    pa, pc = rng.randint(8, 25), rng.randint(3, 12)
    snack = rng.randint(2, 30)
    cost_a, cost_c = na * pa, nc * pc
    total = cost_a + cost_c + snack
    prompt = (
        f"Adult tickets to the zoo cost ${pa} and child tickets cost ${pc}. {name} buys {na} adult tickets "
        f"and {nc} child tickets and spends ${snack} on snacks. How many dollars does the trip cost?"
    )
    lines = [
        f"Adult tickets cost {na} * {pa} = {cost_a} dollars.",
        f"Child tickets cost {nc} * {pc} = {cost_c} dollars.",
        f"The trip costs {cost_a} + {cost_c} + {snack} = {total} dollars.",
    ]
    return prompt, lines, total, {"na": na, "pa": pa, "nc": nc, "pc": pc, "snack": snack}


def _half_then(rng: random.Random) -> Problem:
    a, b = _names(rng, 2)
    good = rng.choice(_GOODS)
    n = rng.randint(5, 50) * 2
    half = n // 2
    more = rng.randint(1, 20)
    prompt = (
        f"{a} has {n} {good}. {a} gives half of them to {b}, and then {b} buys {more} more. "
        f"How many {good} does {b} have now, if {b} had none before?"
    )
    lines = [
        f"{a} gives {b} {n} / 2 = {half} {good}.",
        f"{b} then has {half} + {more} = {half + more} {good}.",
    ]
    return prompt, lines, half + more, {"n": n, "more": more}


#: Template name -> generator of one problem ``(prompt, solution lines, answer, sampled values)``.
TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "shopping_total": _shopping_total,
    "shopping_change": _shopping_change,
    "discount": _discount,
    "distance": _distance,
    "work_rate": _work_rate,
    "ages_sum": _ages_sum,
    "ages_diff": _ages_diff,
    "sharing": _sharing,
    "savings": _savings,
    "farm_revenue": _farm_revenue,
    "fraction_class": _fraction_class,
    "percent_test": _percent_test,
    "reading": _reading,
    "recipe": _recipe,
    "legs": _legs,
    "garden": _garden,
    "minutes_to_hours": _minutes_to_hours,
    "pooling": _pooling,
    "overtime": _overtime,
    "boxes": _boxes,
    "temperature": _temperature,
    "bus": _bus,
    "rectangle": _rectangle,
    "tickets": _tickets,
    "half_then": _half_then,
}


def generate_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``n`` distinct arithmetic word problems, deterministically from ``seed``.

    Templates are used in turn (a seeded shuffle of :data:`TEMPLATES` per round), so every template
    is about equally frequent. Prompts are unique; duplicates are re-drawn.

    Args:
        n: Number of problems (>= 0).
        seed: Seed of the private ``random.Random``; the same ``(n, seed)`` gives the same list, and
            a longer list starts with the shorter one.

    Returns:
        Dicts with ``prompt``, ``response`` (step-by-step, last line ``#### <answer>``), ``answer``
        (canonical integer string), ``template`` (a key of :data:`TEMPLATES`) and ``values`` (the
        sampled quantities, so that answers can be recomputed independently).

    Raises:
        ValueError: if ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    order: list[str] = []
    while len(out) < n:
        if not order:
            order = names[:]
            rng.shuffle(order)
        name = order.pop()
        prompt, lines, answer, values = TEMPLATES[name](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(
            {
                "prompt": prompt,
                "response": "\n".join([*lines, f"#### {answer}"]),
                "answer": str(answer),
                "template": name,
                "values": values,
            }
        )
    return out
