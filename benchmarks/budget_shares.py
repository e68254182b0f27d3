"""Expected domain shares of budgeted batches under each budget rounding (no training).

    python benchmarks/budget_shares.py [--k 4] [--pool 16] [--trials 4000]

Draws pools of ``--pool`` candidates in experiment 8's natural proportions (the instruction
mixture's train rows per domain), gives each pool ``proportional`` budgets for ``--k`` picks with
every rounding of :mod:`mixsel.selection.budgets`, and writes the mean share of each domain in the
budgets to ``benchmarks/results/budget_shares.json``. When k is smaller than the number of domains,
most quotas floor to 0 and the leftover units decide the batch: ``smallest_first`` (the reference
code's rule) hands them out by domain id, so the domains that sort first get more than their share.
PartitionSel, stratified, per_domain and CoLM's big sources all budget this way. ``carry`` treats
the trials as successive steps of one run and carries each domain's remainder from step to step
(:class:`mixsel.selection.budgets.QuotaCarry`), so its shares follow the pools' proportions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixsel.selection.budgets import ROUNDINGS, QuotaCarry, proportional_budgets

# experiment 8's instruction mixture (docs/models.md): train rows per domain, domain ids in this order
SIZES = {
    "arithmetic": 578,
    "chemistry": 173,
    "dictionary": 867,
    "legal": 109,
    "python_code": 4337,
    "scripture": 1735,
    "tech_docs": 201,
}
OUT = Path(__file__).resolve().parent / "results" / "budget_shares.json"


def budget_shares(sizes: dict[str, int], k: int, pool: int, trials: int, rounding: str, seed: int = 0) -> dict:
    """Mean share of each domain in ``proportional`` budgets of ``k`` over ``trials`` random pools.

    With ``rounding="carry"`` the trials are the successive steps of one run (one carry).
    """
    p = torch.tensor(list(sizes.values()), dtype=torch.float64)
    p = p / p.sum()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(sizes), dtype=torch.float64)
    carry = QuotaCarry() if rounding == "carry" else None
    for _ in range(trials):
        counts = torch.bincount(torch.multinomial(p, pool, replacement=True, generator=gen), minlength=len(sizes))
        total += proportional_budgets(counts, k, rounding=rounding, carry=carry).double()
    return {name: round(float(v), 4) for name, v in zip(sizes, total / (trials * k))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="picks per batch (experiment 8: 4)")
    parser.add_argument("--pool", type=int, default=16, help="candidates per pool (experiment 8: 16)")
    parser.add_argument("--trials", type=int, default=4000, help="random pools")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    total = sum(SIZES.values())
    result = {
        "k": args.k,
        "pool": args.pool,
        "trials": args.trials,
        "natural": {name: round(n / total, 4) for name, n in SIZES.items()},
        **{r: budget_shares(SIZES, args.k, args.pool, args.trials, r) for r in ROUNDINGS},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
