"""Per-domain size of the LM-head gradients the unnormalised gradient methods select on.

GradMatch, CRAIG and grad_norm select on the exact, unnormalised per-example gradients of the LM head
(``docs/methods.md``). A greedy pursuit on unnormalised gradients prefers large ones: orthogonal
matching pursuit adds the example whose gradient has the largest inner product with the residual,
which grows with the gradient's norm. This benchmark measures, per domain of the training split, the
per-example LM-head gradient norm ``||G_i||`` (the gradient of the example's mean token loss), its
mean token loss and its number of target tokens, at the base model or at a fine-tuned adapter, and
writes them to ``benchmarks/results/head_grad_norms.json``::

    python benchmarks/head_grad_norms.py                                   # SmolLM2 + LoRA config, base model
    python benchmarks/head_grad_norms.py --adapter runs/.../final --out /tmp/norms.json

Needs ``models/smollm2-135m-instruct`` and ``data/instruct_mix.jsonl`` (``docs/models.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "smollm2_lora.yaml"


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, median, 10th and 90th percentile of ``values`` (rounded)."""
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {
        "mean": round(statistics.fmean(values), 4),
        "median": round(statistics.median(values), 4),
        "p10": round(q[0], 4),
        "p90": round(q[-1], 4),
    }


def head_stats(model: Any, split: Any, rows: Any, pad_token_id: int, *, batch_size: int = 8) -> dict[str, list[float]]:
    """Per row of ``split``: the LM-head gradient norm of its mean token loss, that loss, its target tokens.

    From one inference pass per batch (:func:`mixsel.features.lm_head.head_pass`, ``sq_norms``).
    """
    from mixsel.features.lm_head import head_pass

    out: dict[str, list[float]] = {"grad_norm": [], "loss": [], "target_tokens": []}
    for start in range(0, len(rows), batch_size):
        res = head_pass(model, split.collate(rows[start : start + batch_size], pad_token_id), sq_norms=True)
        out["grad_norm"] += res["grad_sq_norm"].sqrt().tolist()
        out["loss"] += res["loss"].tolist()
        out["target_tokens"] += res["completion_length"].tolist()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder saved by mixsel train (final/)")
    parser.add_argument("--per-domain", type=int, default=32, help="training rows per domain (seeded draw)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "head_grad_norms.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, as for mixsel train")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_cost import config_label, load_model_and_split

    torch.set_num_threads(args.threads)
    cfg, tokenizer, split, model = load_model_and_split(args.config, args.overrides, args.adapter, "train")
    generator = torch.Generator().manual_seed(cfg.seed)
    domains: dict[str, Any] = {}
    for d, name in enumerate(split.domains):
        rows = split.indices_of(d)
        rows = rows[torch.randperm(len(rows), generator=generator)[: args.per_domain]].sort().values
        stats = head_stats(model, split, rows, tokenizer.pad_token_id, batch_size=args.batch_size)
        domains[name] = {"rows": len(rows), **{key: summarize(values) for key, values in stats.items()}}
        norm, loss = domains[name]["grad_norm"]["median"], domains[name]["loss"]["mean"]
        print(f"{name}: ||G|| median {norm:.3f}, loss {loss:.3f}")
    result = {
        "config": config_label(args.config),
        "overrides": args.overrides,
        "adapter": args.adapter,
        "per_domain": args.per_domain,
        "domains": domains,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
