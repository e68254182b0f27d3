"""Checking generated answers against reference answers (exact-match evaluation).

A *checker* is a function ``(prediction: str, reference: str) -> bool``: ``prediction`` is the text a
model generated after a prompt, ``reference`` the example's answer (its ``answer`` column, or the
answer parsed from its response by :func:`reference_answer`). ``eval.answer_checker`` picks one by
name, for every domain or per domain (a mapping; ``"*"`` names the checker of the other domains):

* ``gsm8k`` (the default): the first number (or word) after the prediction's first ``####`` equals
  the reference's, numbers by value, as in GSM8K (Cobbe et al., 2021, arXiv:2110.14168); without a
  marker its last number counts. A reference holding a ``####`` line is read the same way.
* ``exact``: the final answers (:func:`final_answer`) are the same string once whitespace runs are
  collapsed, outer ``$`` and a final period dropped and numbers put in canonical form
  (``1,000.0`` = ``1000``); case-sensitive.
* ``numeric``: the numbers in the final answers are within ``tolerance`` of each other (relative,
  and absolute near zero); ``3/4`` and ``75%`` are read as 0.75 and 75.
* ``sympy``: the final answers are equal expressions, decided by sympy
  (:mod:`mixsel.answers.symbolic`): ``n(n-3)/2`` = ``(n^2-3n)/2``, ``x = -3/4`` = ``-0.75``,
  ``\\frac{1}{2}`` = ``0.5``. Needs sympy (the ``math`` extra; torch installs it too).

Any other value is a path ``package.module:function`` to a user function with the checker signature.
Only a plain Python function (a ``def`` or ``lambda``: not a builtin, a C function, a class or a
``functools.partial``) whose code lies in the user's own files, or in :mod:`mixsel.answers`, is
accepted: a module or function of Python's standard library or of an installed package
(site-packages) is refused, so ``os:popen`` can never run generated text. ``mixsel train`` imports
the checkers only when ``eval.exact_match > 0`` and calls each once at start on :data:`PROBE_PAIR`
(:func:`check_answer_checkers`), so a checker that does not import, takes other arguments, raises or
returns something other than a bool fails before the first step, not after the last.

Example:
    >>> is_correct("... so she pays 12 dollars.\\n#### 12", "12")
    True
    >>> get_checker("numeric")("so the answer is #### 0.75", "3/4")
    True
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import re
import site
import sysconfig
import types
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from mixsel.errors import ConfigError

__all__ = [
    "CHECKERS",
    "PROBE_PAIR",
    "Checker",
    "check_answer_checkers",
    "check_exact",
    "check_gsm8k",
    "check_numeric",
    "checker_names_for",
    "checkers_for",
    "extract_answer",
    "final_answer",
    "get_checker",
    "is_correct",
    "normalize_answer",
    "reference_answer",
    "states_answer",
]

#: ``(prediction, reference) -> bool``
Checker = Callable[[str, str], bool]

#: mixsel's own answer checking (the only mixsel code a user checker path may name)
_OWN_DIR = Path(__file__).resolve().parent

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


# --------------------------------------------------------------------------------------------------
# final answers of free-form solutions
# --------------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the generation stopped inside the box


def reference_answer(response: str) -> str | None:
    """The answer a worked solution states: its ``#### <answer>`` line (GSM8K) or last ``\\boxed{}``
    (the MATH convention, Hendrycks et al., 2021, arXiv:2103.03874); ``None`` if it has neither.

    Used for prompt/response rows without an ``answer`` column, so they are scored too.
    """
    marker = response.find("####")
    if marker >= 0:
        line = response[marker + 4 :].split("\n", 1)[0].strip()
        if line:
            return line
    return _last_boxed(response)


def states_answer(text: str) -> bool:
    """Whether a generation states its answer the way worked solutions do: a ``#### <answer>`` line
    or a ``\\boxed{}`` (:func:`reference_answer`).

    The answer format is something a fine-tuned model has to learn from the responses it trains on;
    without it a checker falls back to the text's last number (``gsm8k``) or last line (``exact``).
    """
    return reference_answer(text) is not None


def final_answer(text: str) -> str:
    """The part of a solution that states its answer, for the ``exact``, ``numeric`` and ``sympy`` checkers.

    The rest of the first ``####`` line if there is one, else the content of the last ``\\boxed{}``,
    else the last non-empty line (so a bare reference such as ``"x = -3/4"`` is its own final answer).
    """
    answer = reference_answer(text)
    if answer is not None:
        return answer
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------------
# built-in checkers
# --------------------------------------------------------------------------------------------------


def check_gsm8k(prediction: str, reference: str) -> bool:
    """GSM8K exact match (:func:`is_correct`); a reference with a ``####`` line is read by :func:`extract_answer`."""
    if "####" in reference:
        reference = extract_answer(reference) or ""
    return is_correct(prediction, reference)


def _canonical_string(text: str) -> str:
    s = " ".join(text.split())
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return normalize_answer(s)


def check_exact(prediction: str, reference: str) -> bool:
    """The final answers are the same string after light normalisation (see the module docstring)."""
    return _canonical_string(final_answer(prediction)) == _canonical_string(final_answer(reference))


_FRACTION = re.compile(r"^(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)$")


def _to_number(text: str) -> float | None:
    """The number a final answer states: a plain number, ``a/b``, ``75%``, else its last number."""
    s = text.replace("$", "").replace(",", "").replace("%", "").replace(" ", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        pass
    frac = _FRACTION.match(s)
    if frac and float(frac.group(2)) != 0:
        return float(frac.group(1)) / float(frac.group(2))
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def check_numeric(prediction: str, reference: str, *, tolerance: float = 1e-6) -> bool:
    """The final answers are numbers within ``tolerance`` of each other (relative, or absolute near 0)."""
    pred, ref = _to_number(final_answer(prediction)), _to_number(final_answer(reference))
    if pred is None or ref is None:
        return False
    return math.isclose(pred, ref, rel_tol=tolerance, abs_tol=tolerance)


def _check_sympy(prediction: str, reference: str, *, tolerance: float = 1e-6) -> bool:
    from mixsel.answers.symbolic import check_sympy

    return check_sympy(prediction, reference, tolerance=tolerance)


#: Built-in checkers by name; those with a ``tolerance`` keyword get ``eval.answer_tolerance``.
CHECKERS: dict[str, Callable[..., bool]] = {
    "gsm8k": check_gsm8k,
    "exact": check_exact,
    "numeric": check_numeric,
    "sympy": _check_sympy,
}
_TAKES_TOLERANCE = ("numeric", "sympy")


def _library_dirs() -> tuple[Path, ...]:
    """The folders of Python's standard library and of installed packages (site-packages)."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user, str):
        dirs.add(user)
    return tuple(Path(d).resolve() for d in dirs)


def _foreign_file(file: str | None) -> str | None:
    """Why code in ``file`` may not be a checker (built in, or a library's), or ``None`` if it may.

    A checker's code must be the user's own (a file outside the standard library and site-packages)
    or mixsel's answer checking (:mod:`mixsel.answers`).
    """
    if file is None:  # a namespace package: no code of its own
        return None
    if file in ("built-in", "frozen"):
        return "built into Python"
    if not file or file.startswith("<"):
        return f"not defined in a file ({file or 'no file'})"
    path = Path(file).resolve()
    if path.is_relative_to(_OWN_DIR):
        return None
    if path.is_relative_to(_OWN_DIR.parent):
        return "mixsel code other than mixsel.answers"
    if any(path.is_relative_to(d) for d in _library_dirs()):
        return f"from Python's standard library or an installed package ({path})"
    return None


def _import_module(path: str, module_name: str) -> Any:
    """Import the checker's module, refusing a built-in or library module before it is imported."""
    fix = "make the module importable (install it, or add its folder to PYTHONPATH)"
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError as err:  # a parent package is missing
        raise ConfigError(f"eval.answer_checker={path!r}: cannot import {module_name!r} ({err}); {fix}") from None
    except Exception as err:  # importing a parent package raised
        raise ConfigError(_import_failure(path, module_name, err)) from None
    if spec is None:
        raise ConfigError(
            f"eval.answer_checker={path!r}: cannot import {module_name!r} (No module named {module_name!r}); {fix}"
        )
    why = _foreign_file(spec.origin)
    if why is not None:
        raise ConfigError(
            f"eval.answer_checker={path!r}: module {module_name!r} is {why}; a checker must be a plain Python "
            f"function of (prediction, reference) in your own module (or a built-in checker: {', '.join(CHECKERS)})"
        )
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # ImportError, SyntaxError, or anything the module's own code raised
        raise ConfigError(_import_failure(path, module_name, err)) from None


def _import_failure(path: str, module_name: str, err: BaseException) -> str:
    """One line for a checker module that could not be imported: the module, where and why."""
    if isinstance(err, SyntaxError):
        where = f"{err.filename}:{err.lineno}" if err.filename else f"line {err.lineno}"
        return f"eval.answer_checker={path!r}: module {module_name!r} has a syntax error at {where} ({err.msg}); fix it"
    if isinstance(err, ImportError):
        return (
            f"eval.answer_checker={path!r}: cannot import {module_name!r} ({err}); make the module importable "
            "(install it, or add its folder to PYTHONPATH)"
        )
    text = " ".join(str(err).split()) or "no message"
    return f"eval.answer_checker={path!r}: importing module {module_name!r} raised {type(err).__name__}: {text}"


def _import_checker(path: str) -> Checker:
    """The user checker ``package.module:function``, refused unless it is a plain Python function of
    (prediction, reference) defined in the user's own code or :mod:`mixsel.answers` (see the module doc)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"eval.answer_checker={path!r} is neither a built-in checker ({', '.join(CHECKERS)}) nor a "
            "'package.module:function' path; use one of those"
        )
    module = _import_module(path, module_name)
    func = getattr(module, attr, None)
    if func is None:
        raise ConfigError(
            f"eval.answer_checker={path!r}: module {module_name!r} has no function {attr!r}; define "
            f"{attr}(prediction: str, reference: str) -> bool there"
        )
    rule = "a checker must be a plain Python function of (prediction, reference) defined in your own module"
    if not isinstance(func, types.FunctionType):
        raise ConfigError(
            f"eval.answer_checker={path!r} is a {type(func).__name__}, not a Python function (def); {rule}"
        )
    why = _foreign_file(func.__code__.co_filename)
    if why is not None:
        raise ConfigError(f"eval.answer_checker={path!r}: {attr!r} is {why}; {rule}")
    signature = inspect.signature(func)
    try:
        signature.bind("prediction", "reference")
    except TypeError:
        takes = ", ".join(str(p).split(":")[0].split("=")[0] for p in signature.parameters.values())
        raise ConfigError(
            f"eval.answer_checker={path!r}: {attr}({takes}) cannot be called as {attr}(prediction, reference); {rule}"
        ) from None
    return func


#: What :func:`check_answer_checkers` calls every checker on at the start of a run.
PROBE_PAIR = ("She pays 3 * 4 = 12 dollars.\n#### 12", "12")


def _probe(name: str, func: Checker) -> None:
    """Call ``func`` once on :data:`PROBE_PAIR`; one line if it raises or does not return a bool."""
    try:
        out = func(*PROBE_PAIR)
    except Exception as err:
        text = " ".join(str(err).split()) or "no message"
        raise ConfigError(
            f"eval.answer_checker={name!r} raised {type(err).__name__} ({text}) when called on the sample pair "
            f"{PROBE_PAIR!r}; a checker must return True or False for any generated text"
        ) from None
    if not _is_bool(out):
        raise ConfigError(
            f"eval.answer_checker={name!r} returned {type(out).__name__} {str(out)[:40]!r} for the sample pair "
            f"{PROBE_PAIR!r}; a checker must return True or False"
        )


def _is_bool(value: Any) -> bool:
    """True/False, numpy's booleans, or the ints 0 and 1."""
    if isinstance(value, bool):
        return True
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return True
    return type(value) is int and value in (0, 1)


def check_answer_checkers(spec: str | Mapping[str, str], *, tolerance: float = 1e-6) -> None:
    """Import every checker ``eval.answer_checker=spec`` names and call each once on :data:`PROBE_PAIR`.

    What ``mixsel train`` and ``mixsel compare`` run at start when ``eval.exact_match > 0``, so a
    checker that cannot import, has the wrong signature, raises or returns something other than a
    bool fails before any step trains. Domain names of a mapping are checked once the data is
    loaded (:func:`checkers_for`).

    Raises:
        ValueError: one line naming ``eval.answer_checker``, the checker and what is wrong.
    """
    names = list(spec.values()) if isinstance(spec, Mapping) else [spec]
    for i, name in enumerate(names):
        if name not in names[:i]:
            _probe(name, get_checker(name, tolerance=tolerance))


def get_checker(name: str, *, tolerance: float = 1e-6) -> Checker:
    """The checker called ``name`` (a built-in, or ``package.module:function``).

    Raises:
        ValueError: an unknown name, or a path that does not import or name a function.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"eval.answer_checker entries must be non-empty strings, got {name!r}")
    if not tolerance >= 0:
        raise ConfigError(f"eval.answer_tolerance={tolerance} must be >= 0")
    if name in CHECKERS:
        func = CHECKERS[name]
        return functools.partial(func, tolerance=tolerance) if name in _TAKES_TOLERANCE else func
    return _import_checker(name)


def checker_names_for(spec: str | Mapping[str, str], domains: Sequence[str]) -> dict[str, str]:
    """The checker name of each domain under ``eval.answer_checker=spec``, nothing imported.

    Raises:
        ValueError: a mapping key that is not a domain (the message lists them).
    """
    if isinstance(spec, str):
        spec = {"*": spec}
    unknown = sorted(set(spec) - set(domains) - {"*"})
    if unknown:
        raise ConfigError(
            f"eval.answer_checker names unknown domain(s) {unknown}; the data has {list(domains)} "
            "(use '*' for all other domains)"
        )
    return {domain: spec.get(domain, spec.get("*", "gsm8k")) for domain in domains}


def checkers_for(
    spec: str | Mapping[str, str], domains: Sequence[str], *, tolerance: float = 1e-6
) -> dict[str, Checker]:
    """The checker of each domain under ``eval.answer_checker=spec``.

    Args:
        spec: one checker name for every domain, or a mapping ``{domain: name}``; ``"*"`` names the
            checker of the domains not listed (default ``"gsm8k"``).
        domains: the domain names of the data.
        tolerance: ``eval.answer_tolerance``, for ``numeric`` and ``sympy``.

    Raises:
        ValueError: a mapping key that is not a domain (the message lists them), or a bad checker name.
    """
    cache: dict[str, Checker] = {}
    out = {}
    for domain, name in checker_names_for(spec, domains).items():
        if name not in cache:
            cache[name] = get_checker(name, tolerance=tolerance)
        out[domain] = cache[name]
    return out
