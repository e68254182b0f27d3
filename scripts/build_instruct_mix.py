"""Build an imbalanced instruction mixture, in SmolLM2's chat template, from mixsel's embedded corpus.

Every row of the embedded corpus (``docs/corpus.md``) becomes at most one chat example, kept in its
domain, with the corpus's natural (imbalanced) proportions scaled down to ``--max-train`` train rows:

================  ======================================================================================
domain            user message -> assistant response
================  ======================================================================================
``arithmetic``    the word problem + 'End your answer with "#### <answer>".' -> the corpus's worked
                  solution ending in ``#### N`` (``answer`` = N, checkable by exact match)
``chemistry``     the same, with the corpus's chemistry questions (answers like ``2.36`` or ``Na``)
``dictionary``    'Define the noun "birdbath".' -> the WordNet gloss, its example and synonyms
``python_code``   a function without its docstring: "What does this Python function do?" -> the
                  docstring's summary; or "Complete this Python function / class" or "Continue this
                  Python code" -> the rest of the stdlib chunk (functions first, then classes, then
                  other chunks)
``scripture``,    "Continue this passage from the King James Bible (Genesis 1:1-3) / a software licence /
``legal``,        the Python language reference" + its first lines or sentences -> the next ones
``tech_docs``
================  ======================================================================================

Splits are made afresh (the corpus has only 32-64 held-out rows per domain): each domain's rows are
ordered with the corpus's own test, then validation, then train rows first (each group in a seeded
shuffle), and cut into ``--qa-test`` (arithmetic, chemistry) or ``--test`` test rows, ``--val``
validation rows, then train rows. A train row whose user message equals a held-out one is dropped.

Every example fits in ``--max-tokens`` tokens of the model's tokenizer as mixsel counts them
(``tokens(prompt) + tokens(response) + 1`` end-of-turn token, the chat template included): long
continuations are cut at a line or word end, other rows that do not fit are left out. Arithmetic and
chemistry rows are never cut and may take up to ``--qa-max-tokens`` (the default keeps every corpus
problem, so that the test set keeps the long molar-mass questions too). The ``prompt``
column is the rendered chat prompt (system, user and the assistant header); the response is the
bare answer, to which mixsel appends the tokenizer's end token (``<|im_end|>`` for SmolLM2), so that
prompt + response + end token is exactly the chat template of the whole conversation.

Usage (needs the converted model's tokenizer: ``bash scripts/get_smollm2.sh``)::

    python scripts/build_instruct_mix.py                     # -> data/instruct_mix.jsonl (+ .stats.json)
    python scripts/build_instruct_mix.py --seed 1 --max-train 4000 --out data/mix_small.jsonl
    mixsel train --config configs/smollm2_lora.yaml          # trains on it

Columns: ``domain``, ``task``, ``split`` (train / validation / test), ``prompt``, ``response``,
``answer`` (null unless checkable), ``instruction`` (the bare user message, to render another
template) and ``tokens``. The output is deterministic given the seed, the corpus and the tokenizer;
it takes a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUT = Path("data/instruct_mix.jsonl")
DEFAULT_TOKENIZER = "models/smollm2-135m-instruct"
QA_DOMAINS = ("arithmetic", "chemistry")
#: Domain order of the output (the embedded corpus's, largest first).
DOMAIN_ORDER = ("python_code", "scripture", "dictionary", "arithmetic", "tech_docs", "chemistry", "legal")
SPLIT_ORDER = ("train", "validation", "test")
QA_SUFFIX = '\n\nEnd your answer with "#### <answer>".'
CONTINUE_SOURCE = {
    "scripture": "the King James Bible",
    "legal": "a software licence",
    "tech_docs": "the Python language reference",
}
HEAD_CHARS = 300  # the longest given beginning of a passage or code chunk (about 70-90 tokens)
CODE_CHARS = 480  # the longest code shown in a "what does it do" or "complete" prompt
MIN_BODY_CHARS = 12  # a continuation shorter than this after cutting to the budget is left out

Row = dict[str, Any]


# ------------------------------------------------------------------------------ row builders


def qa_row(rec: dict[str, Any]) -> Row:
    """A checkable problem: the corpus's prompt, response (ending ``#### N``) and answer."""
    return {
        "task": "solve",
        "instruction": rec["prompt"].strip() + QA_SUFFIX,
        "response": rec["response"].strip(),
        "answer": str(rec["answer"]),
    }


_GLOSS = re.compile(r"^(?P<lemmas>.+?) \((?P<pos>noun|verb|adjective|adverb)\): (?P<gloss>.+)$", re.S)


def dictionary_row(text: str) -> Row | None:
    """'Define the noun "X".' from a WordNet line ``lemma, synonym (pos): gloss; "example"``."""
    match = _GLOSS.match(text.strip())
    if match is None:
        return None
    lemmas = [w.strip() for w in match["lemmas"].split(",") if w.strip()]
    parts = [p.strip() for p in match["gloss"].split("; ")]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    examples = [p.split('"')[1].strip() for p in parts if p.startswith('"') and p.count('"') >= 2]
    if not lemmas or not definition:
        return None
    pos = match["pos"]
    response = f"{lemmas[0]} ({pos}): {definition.rstrip('.')}."
    if examples:
        response += f' For example: "{examples[0]}".'
    if len(lemmas) > 1:
        response += f" Synonyms: {', '.join(lemmas[1:])}."
    return {"task": "define", "instruction": f'Define the {pos} "{lemmas[0]}".', "response": response, "answer": None}


def _signature_end(lines: Sequence[str]) -> int | None:
    """Index of the line that closes a ``def``/``class`` header (brackets balanced, ends with ``:``)."""
    depth = 0
    for i, line in enumerate(lines[:8]):
        code = line.split("#", 1)[0]
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth <= 0 and code.rstrip().endswith(":"):
            return i
    return None


def _docstring(lines: Sequence[str], sig: int) -> tuple[int, int] | None:
    """``(first, last)`` line of the docstring after the header ending on ``lines[sig]``, or ``None``.

    Raises:
        ValueError: the docstring opens but the chunk ends inside it.
    """
    start = next((j for j in range(sig + 1, len(lines)) if lines[j].strip()), None)
    if start is None:
        return None
    first = lines[start].strip().lstrip("rRuU")
    quote = next((q for q in ('"""', "'''") if first.startswith(q)), None)
    if quote is None:
        return None
    if quote in first[3:]:
        return start, start
    for j in range(start + 1, len(lines)):
        if quote in lines[j]:
            return start, j
    raise ValueError("the chunk ends inside the docstring")


def _docstring_summary(doc_lines: Sequence[str]) -> str | None:
    """The first paragraph of a docstring that is prose (not a ``f(x) -> y`` signature line)."""
    text = textwrap.dedent("\n".join(doc_lines)).strip()
    text = re.sub(r'^[rRuU]?("""|\'\'\')', "", text)
    text = re.sub(r'("""|\'\'\')$', "", text).strip()
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para) >= 20 and not re.match(r"^[\w.]+\(.*\)\s*(->|-->)", para):
            return para if len(para) <= 320 else None
    return None


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def python_row(text: str, rng: random.Random) -> Row | None:
    """'What does this function do?', 'Complete this function/class' or 'Continue this code'."""
    lines = textwrap.dedent(text).strip("\n").split("\n")
    header = lines[0].lstrip()
    kind = "function" if re.match(r"(async\s+)?def \w+\(", header) else "class" if header.startswith("class ") else None
    sig = _signature_end(lines) if kind else None
    if kind and sig is not None:
        try:
            doc = _docstring(lines, sig)
        except ValueError:
            return None
        head_end = (doc[1] if doc else sig) + 1
        end = next((j for j in range(head_end, len(lines)) if lines[j][:1].strip()), len(lines))
        lines = _strip_blank(lines[:end])  # the definition only, not what follows it in the chunk
        body = lines[head_end:]
        if sum(1 for b in body if b.strip()) >= 2:
            summary = _docstring_summary(lines[doc[0] : doc[1] + 1]) if doc else None
            if kind == "function" and summary and rng.random() < 0.5:
                shown = _cut_lines(lines[: sig + 1] + body, CODE_CHARS, 14)
                instruction = f"What does this Python function do? Answer in one or two sentences.\n\n{_fenced(shown)}"
                return {"task": "explain_function", "instruction": instruction, "response": summary, "answer": None}
            k = min(3, len(body) // 3)
            head = "\n".join(lines[: head_end + k]).rstrip()
            if len(head) <= CODE_CHARS:
                return {
                    "task": f"complete_{kind}",
                    "instruction": f"Complete this Python {kind}:\n\n{_fenced(head)}",
                    "body": "\n".join(_strip_blank(lines[head_end + k :])),
                    "unit": "line",
                    "wrap": "code",
                    "answer": None,
                }
        return None
    if len(lines) < 3:
        return None
    n_head = _head_lines(lines[: max(1, len(lines) // 3)], HEAD_CHARS)
    head = "\n".join(lines[:n_head]).rstrip()
    rest = "\n".join(_strip_blank(lines[n_head:]))
    return {
        "task": "continue_code",
        "instruction": f"Continue this Python code:\n\n{_fenced(head)}",
        "body": rest,
        "unit": "line",
        "wrap": "code",
        "answer": None,
    }


def _head_lines(lines: Sequence[str], max_chars: int) -> int:
    """How many of the first ``lines`` (at least one) fit in ``max_chars`` characters."""
    size = 0
    for n, line in enumerate(lines):
        size += len(line) + 1
        if n and size > max_chars:
            return n
    return len(lines)


def _cut_lines(lines: Sequence[str], max_chars: int, max_lines: int) -> str:
    """The first lines (at least one) of ``lines`` within ``max_chars`` characters and ``max_lines`` lines."""
    return "\n".join(lines[: _head_lines(lines[:max_lines], max_chars)]).rstrip()


def _strip_blank(lines: Sequence[str]) -> list[str]:
    """``lines`` without leading and trailing blank lines."""
    lines = list(lines)
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def passage_row(text: str, domain: str) -> Row | None:
    """'Continue this passage from <source>': the first lines (or sentences) -> the next ones."""
    source = CONTINUE_SOURCE[domain]
    title = ""
    body = text.strip("\n")
    if domain == "scripture":  # "Genesis 1:1-3\n<verses>": the reference goes into the instruction
        title, _, body = body.partition("\n")
        source = f"{source} ({title.strip()})"
    lines = textwrap.dedent(body).strip("\n").split("\n")
    if len(lines) >= 4:
        n_head = _head_lines(lines[: max(1, len(lines) // 3)], HEAD_CHARS)
        head = "\n".join(lines[:n_head]).rstrip()
        rest = "\n".join(_strip_blank(lines[n_head:]))
        unit = "line"
    else:
        sentences = re.split(r"(?<=[.;:?!])\s+", " ".join(body.split()))
        take, size = 0, 0
        while (
            take < len(sentences) - 1
            and (take == 0 or size + len(sentences[take]) < HEAD_CHARS)
            and (take < max(1, len(sentences) // 3))
        ):
            size += len(sentences[take]) + 1
            take += 1
        head, rest = " ".join(sentences[:take]), " ".join(sentences[take:])
        unit = "word"
        if len(head) > 2 * HEAD_CHARS:
            return None
    if not head.strip() or len(rest) < MIN_BODY_CHARS:
        return None
    return {
        "task": "continue_passage",
        "instruction": f"Continue this passage from {source}:\n\n{head}",
        "body": rest,
        "unit": unit,
        "wrap": "text",
        "answer": None,
    }


def make_row(rec: dict[str, Any], rng: random.Random) -> Row | None:
    """The chat example of one embedded-corpus record (``None`` when the record does not make one)."""
    domain = rec["domain"]
    if domain in QA_DOMAINS:
        return qa_row(rec)
    if domain == "dictionary":
        return dictionary_row(rec["text"])
    if domain == "python_code":
        return python_row(rec["text"], rng)
    if domain in CONTINUE_SOURCE:
        return passage_row(rec["text"], domain)
    raise ValueError(f"no instruction task for domain {domain!r}")


# ------------------------------------------------------------------------------ token budget


def _wrap(row: Row, body: str) -> str:
    return _fenced(body) if row["wrap"] == "code" else body


def fit_row(row: Row, prompt: str, count: Callable[[str], int], max_tokens: int) -> Row | None:
    """Set ``prompt``, ``response`` and ``tokens``; cut a continuation to fit ``max_tokens``.

    ``tokens = count(prompt) + count(response) + 1`` (the end token mixsel appends). Rows without a
    ``body`` (fixed answers) are kept whole or left out; a continuation is cut at its last line
    (code, hard-wrapped text) or word end that fits, preferring a sentence end.
    """
    fixed = count(prompt) + 1
    if "body" not in row:
        total = fixed + count(row["response"])
        return {**row, "prompt": prompt, "tokens": total} if total <= max_tokens else None
    body = row["body"]
    units = [u + "\n" for u in body.split("\n")] if row["unit"] == "line" else re.findall(r"\S+\s*", body)

    def tokens(k: int) -> int:
        return fixed + count(_wrap(row, "".join(units[:k]).rstrip()))

    lo, hi = 0, len(units)  # the largest k with tokens(k) <= max_tokens, by bisection
    if tokens(hi) > max_tokens:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tokens(mid) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        k = lo
        if row["unit"] == "word":  # end on a sentence if that keeps at least half of the words
            ends = [j + 1 for j in range(k) if re.search(r"[.;:?!]\"?\s*$", units[j])]
            if ends and ends[-1] >= k // 2:
                k = ends[-1]
    else:
        k = hi
    body = "".join(units[:k]).rstrip()
    if len(body) < MIN_BODY_CHARS:
        return None
    out = {key: value for key, value in row.items() if key not in ("body", "unit", "wrap")}
    response = _wrap(row, body)
    return {**out, "prompt": prompt, "response": response, "tokens": fixed + count(response)}


# ------------------------------------------------------------------------------ the mixture


def natural_train_sizes(domain_sizes: dict[str, int], max_train: int) -> dict[str, int]:
    """Train rows per domain: the domains' sizes scaled by one factor so they sum to about ``max_train``."""
    total = sum(domain_sizes.values())
    scale = min(1.0, max_train / total) if total else 0.0
    return {d: max(1, round(n * scale)) for d, n in domain_sizes.items()}


def build_mixture(
    records: Sequence[dict[str, Any]],
    *,
    render: Callable[[str], str],
    count: Callable[[str], int],
    seed: int = 0,
    max_tokens: int = 192,
    qa_max_tokens: int = 272,
    max_train: int = 8000,
    val: int = 32,
    test: int = 32,
    qa_test: int = 256,
) -> list[Row]:
    """The instruction mixture of ``records`` (embedded-corpus records), deterministic given ``seed``.

    Args:
        records: dicts with ``domain``, ``split`` and ``text`` or ``prompt``/``response``/``answer``.
        render: the chat prompt of a user message (system, user and assistant header).
        count: the number of tokens of a string (no special tokens added).
        seed: the seed of the per-domain shuffles (and of the Python task choice).
        max_tokens: the longest example, ``count(prompt) + count(response) + 1``; continuations are cut
            to it, other rows longer than it are left out.
        qa_max_tokens: the same for the checkable domains, whose rows are never cut (the default keeps
            every corpus problem, so that the test set has the domain's full range of questions).
        max_train: about the number of train rows; domains keep their relative sizes in ``records``.
        val: validation rows per domain.
        test: test rows per domain that is not checkable.
        qa_test: test rows per checkable domain (arithmetic, chemistry).

    Returns:
        Rows ordered by split (train, validation, test), then domain, then the shuffle, each with
        ``domain``, ``task``, ``split``, ``prompt``, ``response``, ``answer``, ``instruction``, ``tokens``.

    Raises:
        ValueError: a domain has too few usable rows for its held-out sets and one train row.
    """
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_domain.setdefault(rec["domain"], []).append(rec)
    domains = [d for d in DOMAIN_ORDER if d in by_domain] + sorted(set(by_domain) - set(DOMAIN_ORDER))
    train_sizes = natural_train_sizes({d: len(by_domain[d]) for d in domains}, max_train)
    split_rank = {"test": 0, "validation": 1, "train": 2}
    rows: list[Row] = []
    for domain in domains:
        rng = random.Random(f"instruct-mix:{seed}:{domain}")
        recs = by_domain[domain]
        keys = [rng.random() for _ in recs]
        order = sorted(range(len(recs)), key=lambda i: (_kind_rank(recs[i]), split_rank[recs[i]["split"]], keys[i]))
        n_test = qa_test if domain in QA_DOMAINS else test
        wanted = {"test": n_test, "validation": val, "train": train_sizes[domain]}
        taken: dict[str, list[Row]] = {"test": [], "validation": [], "train": []}
        held_out: set[str] = set()
        for i in order:
            split = next((s for s in ("test", "validation", "train") if len(taken[s]) < wanted[s]), None)
            if split is None:
                break
            row = make_row(recs[i], rng)
            if row is None:
                continue
            if split == "train" and row["instruction"] in held_out:
                continue
            limit = qa_max_tokens if domain in QA_DOMAINS else max_tokens
            row = fit_row(row, render(row["instruction"]), count, limit)
            if row is None:
                continue
            if split != "train":
                held_out.add(row["instruction"])
            taken[split].append({"domain": domain, "split": split, **row})
        if len(taken["test"]) < n_test or len(taken["validation"]) < val or not taken["train"]:
            raise ValueError(
                f"domain {domain!r} gives {len(taken['test'])} test, {len(taken['validation'])} validation and "
                f"{len(taken['train'])} train rows, fewer than {n_test} / {val} / 1: lower --test/--qa-test/--val "
                "or raise --max-tokens"
            )
        rows.extend(r for s in SPLIT_ORDER for r in taken[s])
    columns = ("domain", "task", "split", "prompt", "response", "answer", "instruction", "tokens")
    rows = [{c: r.get(c) for c in columns} for r in rows]
    domain_rank = {d: i for i, d in enumerate(domains)}
    return sorted(rows, key=lambda r: (SPLIT_ORDER.index(r["split"]), domain_rank[r["domain"]]))  # stable


def _kind_rank(rec: dict[str, Any]) -> int:
    """Python chunks that open a function first, then classes, then the rest (0 for other domains)."""
    if rec["domain"] != "python_code":
        return 0
    head = textwrap.dedent(rec["text"]).lstrip("\n")
    return 0 if re.match(r"(async\s+)?def \w+\(", head) else 1 if head.startswith("class ") else 2


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Rows per domain and split, tasks per domain, and the token-length distribution per domain."""
    out: dict[str, Any] = {"rows": len(rows), "domains": {}}
    for domain in dict.fromkeys(r["domain"] for r in rows):
        mine = [r for r in rows if r["domain"] == domain]
        lengths = sorted(r["tokens"] for r in mine)
        out["domains"][domain] = {
            "splits": {s: sum(r["split"] == s for r in mine) for s in SPLIT_ORDER},
            "tasks": dict(sorted(Counter(r["task"] for r in mine).items())),
            "tokens": {
                "mean": round(sum(lengths) / len(lengths), 1),
                "min": lengths[0],
                "p50": lengths[len(lengths) // 2],
                "p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
                "max": lengths[-1],
            },
        }
    train = {d: v["splits"]["train"] for d, v in out["domains"].items()}
    out["train_rows"] = sum(train.values())
    out["train_imbalance"] = round(max(train.values()) / min(train.values()), 1)
    return out


def _write_jsonl(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSONL (default: {DEFAULT_OUT})")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder with a chat template")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=192, help="longest example, chat template included")
    parser.add_argument("--qa-max-tokens", type=int, default=272, help="longest arithmetic / chemistry example")
    parser.add_argument("--max-train", type=int, default=8000, help="about the number of train rows")
    parser.add_argument("--val", type=int, default=32, help="validation rows per domain")
    parser.add_argument("--test", type=int, default=32, help="test rows per domain without checkable answers")
    parser.add_argument("--qa-test", type=int, default=256, help="test rows of arithmetic and of chemistry")
    args = parser.parse_args(argv)

    if not Path(args.tokenizer).is_dir():
        print(
            f"error: no tokenizer folder {args.tokenizer!r}; convert SmolLM2 first (bash scripts/get_smollm2.sh) "
            "or pass --tokenizer <folder of a chat model>",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoTokenizer

    from mixsel.data.embedded import EMBEDDED_DIR, load_embedded_records

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if not tokenizer.chat_template:
        print(f"error: the tokenizer in {args.tokenizer} has no chat template", file=sys.stderr)
        return 2

    def render(instruction: str) -> str:
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: the same ids, less overhead

    def count(text: str) -> int:
        if backend is not None:
            return len(backend.encode(text, add_special_tokens=False).ids)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = build_mixture(
        load_embedded_records(),
        render=render,
        count=count,
        seed=args.seed,
        max_tokens=args.max_tokens,
        qa_max_tokens=args.qa_max_tokens,
        max_train=args.max_train,
        val=args.val,
        test=args.test,
        qa_test=args.qa_test,
    )
    _write_jsonl(rows, args.out)
    stats = summarize(rows)
    corpus = EMBEDDED_DIR / "corpus.jsonl.gz"
    stats["built_with"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "output_sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    stats_path = args.out.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    print(f"{'domain':12s} {'train':>6s} {'val':>4s} {'test':>4s}  tokens mean/p50/p90/max  tasks")
    for domain, info in stats["domains"].items():
        s, t = info["splits"], info["tokens"]
        tasks = ", ".join(f"{k} {v}" for k, v in info["tasks"].items())
        print(
            f"{domain:12s} {s['train']:6d} {s['validation']:4d} {s['test']:4d}  "
            f"{t['mean']:5.1f}/{t['p50']}/{t['p90']}/{t['max']:<12}  {tasks}"
        )
    print(
        f"wrote {len(rows)} rows ({stats['train_rows']} train, largest/smallest train domain "
        f"{stats['train_imbalance']}x) to {args.out} and {stats_path.name} in {stats['built_with']['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
