"""A tiny mixed-format fixture mixture, written as JSONL: the data a new user brings.

Four domains, each row pinned to a split by a ``split`` column:

* ``dictionary``: plain text; 3 rows are far longer than 64 tokens.
* ``algebra``: prompt/response rows with expression answers in an ``answer`` column; 2 have very
  long prompts, 2 have responses too long for 64 tokens (one in test: never scored).
* ``chat``: ``messages`` conversations (one multi-turn); answers parsed from ``#### <answer>``.
* ``trl``: TRL's ``prompt``/``completion`` rows; one test completion states no answer.

With ``max_length=64`` and the default ``truncation="left"`` the expected counts are in
:data:`EXPECTED_LEFT` (rows per split, truncated, response cut, dropped, scored test prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

LONG = " ".join(f"filler{i}" for i in range(100))  # hundreds of tokens with any tokenizer
SHORT_TEXTS = [
    "cat (noun): a small domesticated feline",
    "run (verb): move fast on foot",
    "blue (adjective): the colour of a clear sky",
    "quickly (adverb): with speed",
]


def _conv(question: str, answer: str, earlier: tuple[str, str] | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": "Answer briefly."}]
    if earlier is not None:
        turns += [{"role": "user", "content": earlier[0]}, {"role": "assistant", "content": earlier[1]}]
    return [*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def rows() -> list[dict]:
    """The fixture rows, in file order."""
    out: list[dict] = []
    for text in SHORT_TEXTS:
        out.append({"domain": "dictionary", "split": "train", "text": text})
    out += [
        {"domain": "dictionary", "split": "train", "text": "long (adjective): " + LONG},
        {"domain": "dictionary", "split": "train", "text": "longer (adjective): " + LONG + " " + LONG},
        {"domain": "dictionary", "split": "validation", "text": SHORT_TEXTS[0]},
        {"domain": "dictionary", "split": "test", "text": SHORT_TEXTS[1]},
        {"domain": "dictionary", "split": "test", "text": "longest (adjective): " + LONG},
    ]

    def qa(split: str, prompt: str, response: str, answer: str) -> dict:
        return {"domain": "algebra", "split": split, "prompt": prompt, "response": response, "answer": answer}

    out += [
        qa("train", "Expand n(n-3)/2.", "Multiply out.\n#### (n^2-3n)/2", "(n^2-3n)/2"),
        qa("train", LONG + "\nWhat is 2 + 3?", "2 + 3 = 5\n#### 5", "5"),
        qa("train", "What is 3 + 4?", LONG + "\n#### 7", "7"),
        qa("validation", "What is 1/4 + 1/4?", "#### \\frac{1}{2}", "\\frac{1}{2}"),
        qa("test", "How many diagonals has an n-gon?", "Each vertex sees n-3.\n#### n(n-3)/2", "n(n-3)/2"),
        qa("test", LONG + "\nSolve 4x + 3 = 0.", "4x = -3\n#### x = -3/4", "x = -3/4"),
        qa("test", "Half of one?", LONG + "\n#### \\frac{1}{2}", "\\frac{1}{2}"),
        qa("test", "What is one half?", "#### \\frac{1}{2}", "\\frac{1}{2}"),
    ]
    out += [
        {"domain": "chat", "split": "train", "messages": _conv("Say hi.", "Hi.")},
        {"domain": "chat", "split": "train", "messages": _conv("1+1?", "#### 2", earlier=("Ready?", "Yes."))},
        {"domain": "chat", "split": "validation", "messages": _conv("2+1?", "#### 3")},
        {"domain": "chat", "split": "test", "messages": _conv("What is 2+2?", "It is 4.\n#### 4")},
        {"domain": "chat", "split": "test", "messages": _conv("And 3+3?", "#### 6", earlier=("2+2?", "4"))},
    ]
    out += [
        {"domain": "trl", "split": "train", "prompt": "3 * 4 =", "completion": " 12\n#### 12"},
        {"domain": "trl", "split": "train", "prompt": "Name a colour.", "completion": " Blue."},
        {"domain": "trl", "split": "validation", "prompt": "5 * 2 =", "completion": " 10\n#### 10"},
        {"domain": "trl", "split": "test", "prompt": "6 * 2 =", "completion": " 12\n#### 12"},
        {"domain": "trl", "split": "test", "prompt": "Name a fruit.", "completion": " Apple."},
    ]
    return out


def write(path: Path) -> Path:
    """Write the fixture as JSONL at ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    return path


#: domain -> (train, validation, test rows, truncated, response cut, dropped, scored test prompts)
EXPECTED_LEFT = {
    "algebra": (3, 1, 4, 4, 2, 0, 3),
    "chat": (2, 1, 2, 0, 0, 0, 2),
    "dictionary": (6, 1, 2, 3, 0, 0, 0),
    "trl": (2, 1, 2, 0, 0, 0, 1),
}
