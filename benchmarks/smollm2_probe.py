"""Cost probe of the fine-tuning regime: SmolLM2-135M-Instruct + LoRA on the instruction mixture.

Measures what the plan of the fine-tuning experiments needs, with the model, data and LoRA settings of
``configs/smollm2_lora.yaml`` (overrides as for ``mixsel train``), and writes
``benchmarks/results/smollm2_probe.json``::

    python benchmarks/smollm2_probe.py                              # b = 4 and 8, 50 + 50 test prompts
    python benchmarks/smollm2_probe.py --batches 4 --em 10 --reps 3 # quicker
    python benchmarks/smollm2_probe.py --config configs/smollm2_lora.yaml model.lora.r=8

Needs ``models/smollm2-135m-instruct`` and ``data/instruct_mix.jsonl`` (``docs/models.md``). Each part
runs in its own process, so that its peak resident set (``ru_maxrss``) is its own:

* ``step`` (per batch size b): mixsel's training step on b rows drawn uniformly from the train split
  (natural proportions), one micro-batch: forward, per-example loss, backward, clipping, AdamW. Between
  the steps, a no-grad forward of a pool of 4b rows with its per-example losses (what every
  pool-scoring selector pays at least) is timed in the same process, so their ratio is not skewed by
  the machine's load. Seconds are the median and minimum of ``--reps`` repetitions after a warm-up.
* ``exact_match``: the base model (no adapter) answers the first ``--em`` arithmetic and chemistry test
  prompts greedily in the chat template, through :func:`mixsel.evaluate.exact_match` (batches of 16,
  ``eval.max_new_tokens`` new tokens at most); a few answers are kept as samples.

A 1024 x 1024 float32 matmul timed next to every repetition (``calibration_s``) and the load average
show how busy the machine was; ``*_cpu_s`` is the process's CPU time (both threads) of the same calls,
which other processes' load inflates less than the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "smollm2_lora.yaml"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calibration() -> float:
    import torch

    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    return time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _setup(config: str, overrides: list[str], lora: bool) -> tuple[Any, Any, Any, Any]:
    import torch

    from mixsel.config import load_config
    from mixsel.data.build import load_mixture
    from mixsel.model import build_model, build_tokenizer

    cfg = load_config(config, [*overrides, f"model.lora.enabled={str(lora).lower()}"])
    torch.set_num_threads(cfg.train.threads or 2)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
    model = build_model(cfg.model, tokenizer)
    return cfg, tokenizer, mixture, model


def phase_step(config: str, overrides: list[str], batch: int, reps: int) -> dict[str, Any]:
    """Seconds of one training step at ``batch`` and of one no-grad forward of a pool of 4 x ``batch``."""
    import torch

    from mixsel.features.loss import per_example_loss

    rss_start = _rss_mb()
    cfg, tokenizer, mixture, model = _setup(config, overrides, lora=True)
    rss_model = _rss_mb()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(mixture.train)

    def step() -> tuple[float, float, int]:
        batch_ids = torch.randint(0, n, (batch,), generator=gen)
        b = mixture.train.collate(batch_ids, pad)
        cpu, start = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        per_example_loss(logits.float(), b["labels"]).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu, int(b["input_ids"].shape[1])

    def pool_forward() -> tuple[float, float, int]:
        pool_ids = torch.randint(0, n, (4 * batch,), generator=gen)
        p = mixture.train.collate(pool_ids, pad)
        cpu, start = time.process_time(), time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).logits
            per_example_loss(logits.float(), p["labels"])
        return time.perf_counter() - start, time.process_time() - cpu, int(p["input_ids"].shape[1])

    step()  # warm-up; the peak resident set after one step, then after one pool forward
    rss_step = _peak_rss_mb()
    pool_forward()
    rss_pool = _peak_rss_mb()
    steps, pools, steps_cpu, pools_cpu, calib, step_len, pool_len = [], [], [], [], [], [], []
    for _ in range(reps):
        calib.append(_calibration())
        s, c, length = step()
        steps.append(s)
        steps_cpu.append(c)
        step_len.append(length)
        calib.append(_calibration())
        s, c, length = pool_forward()
        pools.append(s)
        pools_cpu.append(c)
        pool_len.append(length)
    return {
        "batch": batch,
        "pool": 4 * batch,
        "reps": reps,
        "step_s": _summary(steps),
        "pool_forward_s": _summary(pools),
        "step_cpu_s": _summary(steps_cpu),
        "pool_forward_cpu_s": _summary(pools_cpu),
        "pool_forward_over_step": round(statistics.median(p / s for p, s in zip(pools, steps)), 3),
        "step_padded_len_mean": round(statistics.mean(step_len), 1),
        "pool_padded_len_mean": round(statistics.mean(pool_len), 1),
        "step_tokens_per_s": round(batch * statistics.mean(step_len) / statistics.median(steps), 1),
        "calibration_s": _summary(calib),
        "trainable_params": sum(p.numel() for p in params),
        "rss_mb": {
            "start": round(rss_start),
            "after_load": round(rss_model),
            "peak_after_first_step": round(rss_step),
            "peak_after_first_pool_forward": round(rss_pool),
            "peak": round(_peak_rss_mb()),
        },
    }


def phase_exact_match(config: str, overrides: list[str], limit: int, samples: int) -> dict[str, Any]:
    """The base model's exact match on the first ``limit`` arithmetic and chemistry test prompts."""
    import torch

    from mixsel.evaluate import exact_match

    cfg, tokenizer, mixture, model = _setup(config, overrides, lora=False)
    model.eval()
    test = mixture.test
    out: dict[str, Any] = {"limit": limit, "max_new_tokens": cfg.eval.max_new_tokens}
    start = time.perf_counter()
    calib_before = _calibration()
    scores = exact_match(model, tokenizer, test, limit=limit, max_new_tokens=cfg.eval.max_new_tokens, prefix="test")
    seconds = time.perf_counter() - start
    prompts = sum(
        min(limit, sum(a is not None for a, d in zip(test.answers, test.domain_ids) if int(d) == i))
        for i in range(len(test.domains))
    )
    out.update(
        scores={k: round(v, 4) for k, v in scores.items()},
        prompts=prompts,
        seconds=round(seconds, 1),
        seconds_per_prompt=round(seconds / max(1, prompts), 3),
        calibration_s=round((calib_before + _calibration()) / 2, 3),
    )
    from mixsel.data.arithmetic import extract_answer

    kept = []
    for d, name in enumerate(test.domains):
        rows = [int(i) for i in test.indices_of(d) if test.answers[int(i)] is not None][:samples]
        for i in rows:
            labels = test.labels[i]
            prompt = test.input_ids[i][: int(torch.nonzero(labels != -100).flatten()[0])]
            with torch.no_grad():
                gen = model.generate(
                    input_ids=prompt[None],
                    attention_mask=torch.ones_like(prompt)[None],
                    max_new_tokens=cfg.eval.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            text = tokenizer.decode(gen[0, prompt.numel() :], skip_special_tokens=True)
            kept.append({"domain": name, "answer": test.answers[i], "extracted": extract_answer(text), "output": text})
    out["samples"] = kept
    out["rss_mb_peak"] = round(_peak_rss_mb())
    return out


def _run_phase(args: argparse.Namespace, phase: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--config",
        args.config,
        "--phase",
        *phase,
        "--reps",
        str(args.reps),
        "--samples",
        str(args.samples),
        *args.overrides,
    ]
    print("running", " ".join(phase), flush=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_avg_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--em", type=int, default=50, help="test prompts per checkable domain (0 = skip)")
    parser.add_argument("--samples", type=int, default=2, help="answers kept per checkable domain")
    parser.add_argument("--out", type=Path, default=RESULTS / "smollm2_probe.json")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides of the config, as for mixsel train")
    args = parser.parse_args(argv)

    if args.phase:  # a child process: one part, its JSON on the last line of stdout
        kind, value = args.phase[0], int(args.phase[1])
        if kind == "step":
            result = phase_step(args.config, args.overrides, value, args.reps)
        else:
            result = phase_exact_match(args.config, args.overrides, value, args.samples)
        print(json.dumps(result))
        return 0

    import torch

    start = time.perf_counter()
    load_before = os.getloadavg()
    result: dict[str, Any] = {"meta": {}, "steps": [], "exact_match": None}

    def save() -> None:  # after every part, so that an interrupted probe keeps what it measured
        result["meta"] = {
            "command": " ".join(["python", "benchmarks/smollm2_probe.py", *(sys.argv[1:] if argv is None else argv)]),
            "config": os.path.relpath(args.config, ROOT),
            "overrides": args.overrides,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - start, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for b in args.batches:
        result["steps"].append(_run_phase(args, ["step", str(b)]))
        save()
    if args.em:
        result["exact_match"] = _run_phase(args, ["exact_match", str(args.em)])
        save()
    steps, em = result["steps"], result["exact_match"]
    for s in steps:
        print(
            f"b={s['batch']}: step {s['step_s']['median']:.2f}s (min {s['step_s']['min']:.2f}, padded length "
            f"{s['step_padded_len_mean']:.0f}); pool forward of {s['pool']} {s['pool_forward_s']['median']:.2f}s "
            f"({s['pool_forward_over_step']:.2f}x the step); peak RSS {s['rss_mb']['peak']} MB"
        )
    if em:
        print(f"base exact match {em['scores']} on {em['prompts']} prompts, {em['seconds_per_prompt']:.2f}s per prompt")
    print(f"load average {result['meta']['load_avg_before']} -> {result['meta']['load_avg_after']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
