"""The ``sympy`` answer checker: are two final answers the same mathematical expression?

Both answers are read by :func:`mixsel.answers.final_answer`, turned into plain expressions, parsed
with sympy's ``parse_expr`` (implicit multiplication ``3n``, ``n(n-3)``; ``^`` as power) and compared
by ``simplify(a - b) == 0``, or, when the difference is a number, within ``tolerance`` relative to
the reference (so ``1/3`` matches ``0.333333`` only with ``tolerance >= 1e-6``).

An equation keeps what follows its last ``=`` (``x = -3/4`` is ``-3/4``); a tuple such as ``(1, 2)``
matches element by element; ``1,000`` is a thousand; a trailing period, ``%`` and ``$`` are dropped.

LaTeX is turned into plain text by a small, documented normalisation rather than sympy's
``parse_latex``, which needs ANTLR 4.11 (a pinned runtime) or Lark, and whose Lark grammar finds
``n(n-3)`` ambiguous. The normalisation:

* drops ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\left``, ``\\right``, ``\\big`` and friends,
  spacing (``\\,`` ``\\;`` ``\\!`` ``\\quad``), ``\\displaystyle``, ``\\%``, degree signs, and
  ``\\text{...}`` / ``\\mbox{...}`` / ``\\textbf{...}`` with their content (units and words);
* keeps the content of ``\\mathrm{...}``, ``\\mathbf{...}``, ``\\operatorname{...}``;
* ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``, ``\\frac12``) -> ``((a)/(b))``;
  ``\\sqrt{x}`` -> ``sqrt(x)``; ``\\sqrt[n]{x}`` -> ``((x)**(1/(n)))``;
* ``\\cdot``, ``\\times`` -> ``*``; ``\\div`` -> ``/``; ``\\pi`` -> ``pi``; ``\\infty`` -> ``oo``;
  ``\\sin``, ``\\cos``, ``\\tan``, ``\\log``, ``\\exp`` -> the function, ``\\ln`` -> ``log``;
* ``x_{12}`` -> ``x_12``; remaining braces become parentheses (``2^{n+1}`` -> ``2^(n+1)``).

Any other ``\\command`` makes the answer unreadable, and an unreadable answer is never correct.

Generated text is untrusted: ``parse_expr`` evaluates Python, so an answer is parsed only if it is
at most 200 characters of letters, digits, spaces and ``+-*/^().,!=``, with no ``__`` and no
attribute access; only a few sympy names are visible to it (``sqrt``, ``pi``, ``log``, ``exp``,
``sin``, ``cos``, ``tan``, ``Abs``, ``E``, ``oo``), and exponents above 10,000 and factorials above
1,000 are refused (``9^9^9`` would take hours).
"""

from __future__ import annotations

import re
from typing import Any

from mixsel.answers import final_answer

__all__ = ["check_sympy", "latex_to_text", "parse_answer"]

_MAX_CHARS = 200
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 1_000
#: The sympy names an answer may use; other names become symbols (``x``) or undefined functions (``f(x)``).
_NAMES = ("Symbol", "Integer", "Float", "Rational", "Function", "factorial", "sqrt", "pi", "oo", "E")
_NAMES += ("log", "exp", "sin", "cos", "tan", "Abs", "Add", "Mul", "Pow")

_DROP_WITH_CONTENT = ("\\text", "\\mbox", "\\textbf", "\\textit", "\\textrm")
_KEEP_CONTENT = ("\\mathrm", "\\mathbf", "\\operatorname", "\\mathit", "\\boxed")
_REPLACE = (
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cdot", "*"),
    ("\\times", "*"),
    ("\\div", "/"),
    ("\\pi", " pi "),
    ("\\infty", " oo "),
    ("\\ln", " log"),
    ("\\%", ""),
    ("^\\circ", ""),
    ("^{\\circ}", ""),
)
_FUNCTIONS = ("sin", "cos", "tan", "log", "exp")
_DROP = re.compile(r"\\left|\\right|\\[bB]igg?[lr]?|\\displaystyle|\\quad|\\qquad|\\[,;:! ]|\\\(|\\\)|\\\[|\\\]|\$")
_SAFE = re.compile(r"^[0-9A-Za-z\s+\-*/^().,!=]*$")
_ATTRIBUTE = re.compile(r"[A-Za-z_)\]]\s*\.\s*[A-Za-z_]")
_FACTORIAL = re.compile(r"(\d+)\s*!")


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at ``s[i]``: a ``{...}`` group (braces matched) or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("a LaTeX command lacks its argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")


def _expand(s: str) -> str:
    """Rewrite ``\\frac``, ``\\sqrt`` and the content-keeping / -dropping commands, innermost first."""
    out = []
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _group(s, i + 5)
            den, i = _group(s, i)
            out.append(f"(({_expand(num)})/({_expand(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            if i < len(s) and s[i] == "[":
                end = s.index("]", i)
                root = s[i + 1 : end]
                arg, i = _group(s, end + 1)
                out.append(f"(({_expand(arg)})**(1/({_expand(root)})))")
            else:
                arg, i = _group(s, i)
                out.append(f"sqrt({_expand(arg)})")
        elif any(s.startswith(cmd + "{", i) for cmd in _DROP_WITH_CONTENT):
            _, i = _group(s, s.index("{", i))
        elif any(s.startswith(cmd + "{", i) for cmd in _KEEP_CONTENT):
            arg, i = _group(s, s.index("{", i))
            out.append(f"({_expand(arg)})")
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def latex_to_text(latex: str) -> str:
    """Plain-expression text of a LaTeX answer, by the normalisation in the module docstring.

    Raises:
        ValueError: an unbalanced group or a LaTeX command outside the supported set.
    """
    s = latex
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = _DROP.sub(" ", s)
    s = _expand(s)
    for name in _FUNCTIONS:
        s = s.replace("\\" + name, " " + name)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)
    unknown = re.search(r"\\[A-Za-z]+|\\.", s)
    if unknown:
        raise ValueError(f"unsupported LaTeX {unknown.group(0)!r}")
    return s.replace("{", "(").replace("}", ")")


def _plain(answer: str) -> str:
    s = answer.strip()
    if "\\" in s or "{" in s:
        s = latex_to_text(s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,000 -> 1000 (but keep tuples such as (1,2))
    s = s.replace("%", "").replace("$", "").strip().rstrip(".").strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    return s


def _too_big(expr: Any) -> bool:
    """True if evaluating ``expr`` would build a huge number (an exponent above 10,000)."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            try:
                if abs(complex(node.exp.evalf(15))) > _MAX_EXPONENT:
                    return True
            except (TypeError, ValueError, OverflowError):
                return True
    return False


def parse_answer(answer: str) -> Any:
    """A sympy expression (or tuple of them) for a final answer; ``None`` if it cannot be read safely."""
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    try:
        text = _plain(answer)
    except ValueError:
        return None
    if not text or len(text) > _MAX_CHARS or not _SAFE.match(text) or "__" in text or _ATTRIBUTE.search(text):
        return None
    # factorials are evaluated while parsing, so they are checked in the text
    if "factorial" in text or any(int(n) > _MAX_FACTORIAL for n in _FACTORIAL.findall(text)):
        return None
    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    names = {name: getattr(sympy, name) for name in _NAMES}
    letters = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDFGHJKLMNOPQRSTUVWXYZ"}
    try:
        raw = parse_expr(text, local_dict=letters, global_dict=names, transformations=transformations, evaluate=False)
        parts = raw if isinstance(raw, tuple) else (raw,)
        if any(not isinstance(p, sympy.Basic) or _too_big(p) for p in parts):
            return None
        return parse_expr(text, local_dict=letters, global_dict=names, transformations=transformations)
    except Exception:  # sympy raises many kinds (SyntaxError, TokenError, TypeError, ...) on bad input
        return None


def _equal(a: Any, b: Any, tolerance: float) -> bool:
    import sympy

    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
            return False
        return all(_equal(x, y, tolerance) for x, y in zip(a, b))
    try:
        if a == b:
            return True
        diff = sympy.simplify(a - b)
        if diff == 0:
            return True
        if diff.is_number:
            scale = max(1.0, abs(complex(b.evalf())))
            return abs(complex(diff.evalf())) <= tolerance * scale
    except Exception:  # e.g. comparing a relation with a number
        return False
    return False


def check_sympy(prediction: str, reference: str, *, tolerance: float = 1e-6) -> bool:
    """The final answers of ``prediction`` and ``reference`` are the same expression (see the module)."""
    ref = parse_answer(final_answer(reference))
    if ref is None:
        return False
    pred = parse_answer(final_answer(prediction))
    return pred is not None and _equal(pred, ref, tolerance)
