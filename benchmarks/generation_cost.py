"""What exact match costs, decoding finished rows to the end of their batch or dropping them.

:func:`mixsel.evaluate.exact_match` decodes with :func:`mixsel.evaluate.greedy_generate`, which runs
``generate`` ``--chunk`` tokens at a time and drops the rows that have ended. This benchmark scores the
same test prompts twice in one process - with ``--chunk`` and with one ``generate`` call per batch
(chunk = ``eval.max_new_tokens``, what mixsel did before: a batch decodes until its longest row ends) -
checks that every generated text is the same, and writes the seconds, the generated tokens and the
token-steps each decode computed to ``benchmarks/results/generation_cost.json``::

    python benchmarks/generation_cost.py                                   # SmolLM2 + LoRA config, base model
    python benchmarks/generation_cost.py --adapter runs/.../final --per-domain 64 --batch-size 64

The config (``configs/smollm2_lora.yaml`` and overrides, as for ``mixsel train``) gives the model, the
data and ``eval.max_new_tokens``; ``--adapter`` loads a LoRA adapter that ``mixsel train`` saved (its
``final/`` folder), since a fine-tuned model ends its answers differently from the base model. Needs
``models/smollm2-135m-instruct`` and ``data/instruct_mix.jsonl`` (``docs/models.md``). The two decodes
alternate in order (``--reps``) so that a change in the machine's load affects both; ``cpu_s`` is the
process's CPU time, which other processes' load inflates less than the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "smollm2_lora.yaml"


def token_steps(lengths: list[int], batch_size: int, chunk: int, limit: int) -> int:
    """Row-steps a decode computes: per batch, each chunk decodes every row still running for the chunk.

    Args:
        lengths: generated tokens per row (end-of-sequence token included), in scoring order.
        batch_size: rows per batch.
        chunk: tokens between removals of ended rows (``>= limit``: one call, every row runs to the
            batch's longest).
        limit: ``eval.max_new_tokens``.
    """
    total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        done = 0
        while done < limit and any(n > done for n in batch):
            step = min(chunk, limit - done)
            running = [n for n in batch if n > done]
            # generate stops when every running row has ended: this chunk lasts to the longest of them
            total += len(running) * min(step, max(running) - done)
            done += step
    return total


def load_model_and_split(config: str, overrides: list[str], adapter: str | None, split: str) -> tuple[Any, ...]:
    """The config (``mixsel train``'s file and overrides), its tokenizer, one split of its data and its model.

    ``adapter``, when given, is a LoRA adapter folder that ``mixsel train`` saved (its ``final/``),
    loaded into the config's LoRA modules. The model is returned in ``eval()`` mode.
    """
    from mixsel.config import load_config
    from mixsel.data.build import load_mixture
    from mixsel.model import build_model, build_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = build_tokenizer(cfg.model)
    rows = getattr(load_mixture(cfg.data, tokenizer, seed=cfg.seed), split)
    model = build_model(cfg.model, tokenizer)
    if adapter:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(adapter) / "adapter_model.safetensors"))
        missing = set_peft_model_state_dict(model, state).unexpected_keys
        if missing:
            raise SystemExit(f"{adapter}: {len(missing)} adapter tensors match no LoRA module of the config")
    return cfg, tokenizer, rows, model.eval()


def config_label(config: str) -> str:
    """``config`` relative to the repository when it lies inside it (as results record it)."""
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder saved by mixsel train (final/)")
    parser.add_argument("--per-domain", type=int, default=32, help="test prompts per scored domain")
    parser.add_argument("--batch-size", type=int, default=32, help="eval.generation_batch_size")
    parser.add_argument("--chunk", type=int, default=16, help="greedy_generate's chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "generation_cost.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, as for mixsel train")
    args = parser.parse_args(argv)

    import torch

    from mixsel.evaluate import exact_match

    torch.set_num_threads(args.threads)
    cfg, tokenizer, split, model = load_model_and_split(args.config, args.overrides, args.adapter, "test")
    limit = cfg.eval.max_new_tokens

    runs: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {}
    modes = {"drop_finished": args.chunk, "one_call": limit}
    for rep in range(args.reps):
        for mode, chunk in modes.items() if rep % 2 == 0 else reversed(modes.items()):
            records: list[dict[str, Any]] = []
            wall, cpu = time.perf_counter(), time.process_time()
            scores = exact_match(
                model, tokenizer, split, limit=args.per_domain, max_new_tokens=limit,
                batch_size=args.batch_size, prefix="test", records=records, chunk=chunk,
            )  # fmt: skip
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            lengths = [r["new_tokens"] for r in records]
            runs.setdefault(mode, {"wall_s": [], "cpu_s": []})
            runs[mode]["wall_s"].append(round(wall, 2))
            runs[mode]["cpu_s"].append(round(cpu, 2))
            runs[mode].update(
                chunk=chunk, scores=scores, token_steps=token_steps(lengths, args.batch_size, chunk, limit)
            )
            texts[mode] = [r["generated"] for r in records]
            print(f"{mode}: {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    per_domain: dict[str, dict[str, float]] = {}
    for r in records:
        d = per_domain.setdefault(r["domain"], {"prompts": 0, "tokens": 0, "unfinished": 0, "answer_marker": 0})
        d["prompts"] += 1
        d["tokens"] += r["new_tokens"]
        d["unfinished"] += not r["finished"]
        d["answer_marker"] += "####" in r["generated"]
    lengths = [r["new_tokens"] for r in records]
    result = {
        "config": config_label(args.config),
        "overrides": args.overrides,
        "adapter": args.adapter,
        "per_domain": args.per_domain,
        "batch_size": args.batch_size,
        "max_new_tokens": limit,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "identical_texts": sum(a == b for a, b in zip(texts["drop_finished"], texts["one_call"])),
        "prompts": len(records),
        "generated_tokens": sum(lengths),
        "domains": per_domain,
        "runs": runs,
        "speedup_wall": round(min(runs["one_call"]["wall_s"]) / min(runs["drop_finished"]["wall_s"]), 2),
        "speedup_token_steps": round(runs["one_call"]["token_steps"] / runs["drop_finished"]["token_steps"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("identical_texts", "prompts", "speedup_wall", "speedup_token_steps")}))
    return result


if __name__ == "__main__":
    main()
