"""The data summary printed at the start of a run: domains, rows per split, what truncation did.

:func:`summarize` gathers the per-domain :class:`~mixsel.data.tokenize.DomainCounts` of the
tokenised splits into a :class:`DataSummary` (kept in ``Mixture.summary``, and returned by the
Hugging Face helper); :func:`format_data_summary` renders it as a few lines of text::

    data: /home/me/mix.jsonl
    2 domains, max_length=128, truncation=left, prompt and response joined by separator '\\n'
      domain      kind             train  val  test  truncated  response cut  dropped  scored
      dictionary  text               500   32    32   12 (2%)             -        0           -
      math        prompt/response    300   32    32  40 (11%)             3        0  32 (sympy)

*truncated* counts the rows (all splits) longer than ``data.max_length``; *response cut* the
prompt/response rows among them that lost part of their response, or were dropped for length
(never scored); *scored* the test prompts exact match may score, with their checker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mixsel.data.tokenize import DomainCounts

if TYPE_CHECKING:
    from mixsel.config import EvalConfig

__all__ = ["DataSummary", "format_data_summary", "summarize"]


@dataclass
class DataSummary:
    """Where the data came from, how it was tokenised, and what each split holds per domain."""

    # the data source, resolved: an absolute path, "embedded (<path>)", or a Hugging Face dataset name
    source: str
    # the domain names, in domain-id order
    domains: list[str]
    # data.max_length
    max_length: int
    # data.truncation
    truncation: str
    # how prompt and response are joined: "chat template" or "separator '<sep>'"
    formatting: str
    # split name ("train", "validation", "test") -> domain name -> what tokenisation did
    counts: dict[str, dict[str, DomainCounts]] = field(default_factory=dict)
    # data.streaming: how the training rows are read (shown under the table; the train column says
    # "stream", as their number is not known up front); "" = a prepared or in-memory train split
    streaming: str = ""

    def total(self, domain: str) -> DomainCounts:
        """The counts of ``domain`` summed over the splits."""
        out = DomainCounts()
        for per_domain in self.counts.values():
            out = out.add(per_domain.get(domain, DomainCounts()))
        return out

    def rows(self, split: str, domain: str) -> int:
        """Examples of ``domain`` kept in ``split``."""
        return self.counts.get(split, {}).get(domain, DomainCounts()).rows


def summarize(
    splits: Mapping[str, Any], *, source: str, max_length: int, truncation: str, formatting: str
) -> DataSummary:
    """A :class:`DataSummary` of tokenised splits (``{"train": TokenizedSplit, ...}``)."""
    domains = list(next(iter(splits.values())).domains) if splits else []
    counts = {name: {d: split.counts.get(d, DomainCounts()) for d in domains} for name, split in splits.items()}
    return DataSummary(
        source=source,
        domains=domains,
        max_length=int(max_length),
        truncation=truncation,
        formatting=formatting,
        counts=counts,
    )


def _share(part: int, whole: int) -> str:
    if part == 0:
        return "0" if whole else "-"
    pct = 100 * part / whole if whole else 100.0
    return f"{part} ({'<1' if pct < 1 else round(pct)}%)"


def _kind(c: DomainCounts) -> str:
    if c.instruction == 0:
        return "text"
    return "prompt/response" if c.instruction == c.rows else "mixed"


def format_data_summary(summary: DataSummary, eval_cfg: EvalConfig | None = None) -> str:
    """The data summary as a few lines of text (see the module docstring), to print at the start of a run.

    Args:
        summary: ``mixture.summary``.
        eval_cfg: the run's :class:`mixsel.config.EvalConfig`; when given, the *scored* column names
            each domain's answer checker, and a line warns for every scored domain whose longest
            test reference response is longer than ``eval.max_new_tokens`` (in tokens).

    Raises:
        ValueError: ``eval_cfg.answer_checker`` names an unknown domain, or (with ``eval.exact_match > 0``:
            only then is a checker imported) an unknown checker, so a typo shows at the start of a run
            rather than at its final evaluation.
    """
    checkers: dict[str, str] = {}
    if eval_cfg is not None:
        from mixsel.answers import checker_names_for, checkers_for

        checkers = checker_names_for(eval_cfg.answer_checker, summary.domains)  # raises on a bad domain
        if eval_cfg.exact_match > 0:  # raises on a bad name
            checkers_for(eval_cfg.answer_checker, summary.domains, tolerance=eval_cfg.answer_tolerance)
    head = ["domain", "kind", "train", "val", "test", "truncated", "response cut", "dropped", "scored"]
    rows, warnings = [], []
    for domain in summary.domains:
        total = summary.total(domain)
        test = summary.counts.get("test", {}).get(domain, DomainCounts())
        seen = total.rows + total.dropped
        scored = "-"
        if test.scored:
            scored = f"{test.scored} ({checkers[domain]})" if checkers else str(test.scored)
            if eval_cfg is not None and eval_cfg.exact_match and test.response_tokens_max > eval_cfg.max_new_tokens:
                warnings.append(
                    f"warning: eval.max_new_tokens={eval_cfg.max_new_tokens} < {test.response_tokens_max} tokens, "
                    f"the longest test reference of {domain!r}: raise it, or those answers cannot be generated"
                )
        rows.append(
            [
                domain,
                _kind(total),
                "stream" if summary.streaming else str(summary.rows("train", domain)),
                str(summary.rows("validation", domain)),
                str(summary.rows("test", domain)),
                _share(total.truncated, seen),
                str(total.response_cut) if total.instruction or total.response_cut else "-",
                str(total.dropped),
                scored,
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [
        f"data: {summary.source}",
        f"{len(summary.domains)} domains, max_length={summary.max_length}, truncation={summary.truncation}, "
        f"prompt and response joined by {summary.formatting}",
        line(head),
        *(line(r) for r in rows),
        *([summary.streaming] if summary.streaming else []),
        *warnings,
    ]
    return "\n".join(lines)
