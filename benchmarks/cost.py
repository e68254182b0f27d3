"""What selection and reweighting cost against their floor: time split, peak memory, scaling (issue 16).

One command, every figure a ratio of times measured side by side in ONE process::

    python benchmarks/cost.py --quick     # ~3 min: 2 repetitions, pools 32-128, the embedded model only
    python benchmarks/cost.py             # <= 15 min: 6 repetitions, pools 32-1024, embedded + SmolLM2-135M/LoRA
    python benchmarks/cost.py --part overhead --threads 2 --reps 8
    python benchmarks/cost.py --threads 1 --clock cpu   # a loaded machine: ratios of process CPU time
    python benchmarks/cost.py --quick --device cuda     # the same ratios on a GPU (peak = max_memory_allocated)

Results: ``benchmarks/results/cost.json`` and ``cost.png`` (the methods' ratios against the targets),
``cost_scaling.json`` and ``cost_scaling.png`` (selection s/step and peak memory against pool and
model size).

**Overhead** (``--part overhead``): the default config (``configs/default.yaml``: the embedded tiny
Llama, batch 16 from a pool of 64) and one runner per method with that method's overrides. Each
runner repeats the steps of ``mixsel train`` (``src/mixsel/train.py``, steps 1-4: draw the pool,
:class:`~mixsel.step.OnlineSelector`, the weighted micro-batched train step, the domain statistics
and the reweighter update) on one shared model. The methods run **interleaved**: every repetition
runs one step of each method (a reweighter: ``update_every`` steps, so its cost is averaged over its
update window) in a freshly shuffled order, so a change of machine load hits all of them alike; each
ratio is taken within a repetition and the median over repetitions is reported. The **floor** is
``random`` (train on b) plus one plain no-grad forward of the pool
(``model(input_ids, attention_mask)`` under ``torch.no_grad``), measured as a method of its own in
the same repetitions. Wall-clock and CPU (process) times are both recorded; ratios use wall time.

**Peak memory**: the torch profiler's memory events (``profile_memory=True``) give every CPU tensor
allocation and free; their running sum over one step (after the timed repetitions, not timed)
is the step's peak *extra* tensor memory, exactly like ``torch.cuda.max_memory_allocated`` on a GPU
and independent of the machine load and of the allocator's caching (the resident set size is not:
glibc keeps freed blocks, so later methods in one process would look cheaper). The reported total
adds the tensors every step keeps (parameters, gradients, AdamW state), which are the same for
every method of one model.

**Scaling** (``--part scaling``): selection s/step (pool forward + features + solver) and the
train step, and peak memory, for ``partitionsel``, ``colm``, ``greats`` and ``random_4b`` against
the pool size n (batch n/4; ``random_4b`` trains on all n), and against the model size (the
embedded model, and SmolLM2-135M with LoRA r=8 on the same pools: the converted checkpoint folder
``models/smollm2-135m-instruct`` when it exists, else a config-built model of its shape with random
weights, which costs the same). Each point names the term that dominates. A point whose predicted
time (quadratic extrapolation from the previous pool size) exceeds ``--max-point-s`` is skipped and
recorded as skipped.

The machine load (1-minute load average) is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
SMOLLM_DIR = ROOT / "models" / "smollm2-135m-instruct"

log = logging.getLogger("cost")

_WALL = time.perf_counter  # kept before --clock cpu replaces time.perf_counter
_CPU = time.process_time
DEVICE = torch.device("cpu")  # --device; every model of the run goes there

PHASES = ("forward", "features", "solver", "other", "train", "reweight")

AMORTIZED = ["reweighting.update_every=5", "reweighting.amortize=true"]
POOL_ROWS = "reweighting.grad_rows=pool"  # DoGraph's domain gradients from a separate pass over the pool

#: name -> (overrides of configs/default.yaml, kind). Kinds: floor | heuristic | gradient | reweighting.
METHODS: dict[str, tuple[list[str], str]] = {
    "random": (["selection.method=random"], "floor"),
    "random_4b": (["selection.method=random", "train.batch_size={pool}"], "baseline"),  # trains on the whole pool
    "stratified": (["selection.method=stratified"], "heuristic"),
    "big_loss": (["selection.method=big_loss"], "heuristic"),
    "middle_ppl": (["selection.method=middle_ppl"], "heuristic"),
    "least_confidence": (["selection.method=least_confidence"], "heuristic"),
    "completion_length": (["selection.method=completion_length"], "heuristic"),
    "hidden_fl": (["selection.method=hidden_fl"], "heuristic"),
    "grad_norm": (["selection.method=grad_norm"], "gradient"),
    "partitionsel": (["selection.method=partitionsel"], "gradient"),
    # the same selector with cheaper features than its reference (last 3 blocks, exact): the LM head
    # (exact, ghost inner products), or the last 3 blocks Kronecker-projected to 512 dimensions
    "partitionsel_head": (["selection.method=partitionsel", "selection.features.source=lm_head"], "option"),
    "partitionsel_proj": (["selection.method=partitionsel", "selection.features.projection_dim=512"], "option"),
    "per_domain": (["selection.method=per_domain"], "gradient"),
    "greats": (["selection.method=greats"], "gradient"),
    "gradmatch": (["selection.method=gradmatch"], "gradient"),
    "craig": (["selection.method=craig"], "gradient"),
    "colm": (["selection.method=colm"], "gradient"),
    "dograph": (["selection.method=random", "reweighting.method=dograph"], "reweighting"),
    "dograph_u5": (["selection.method=random", "reweighting.method=dograph", *AMORTIZED], "reweighting"),
    "dograph_pool": (
        ["selection.method=random", "reweighting.method=dograph", "reweighting.grad_rows=pool"],
        "reweighting",
    ),
    "doremi": (["selection.method=random", "reweighting.method=doremi"], "reweighting"),
    "doremi_u5": (["selection.method=random", "reweighting.method=doremi", *AMORTIZED], "reweighting"),
}
QUICK_METHODS = [m for m in METHODS if m != "dograph_pool"]
SCALING_METHODS = ("random_4b", "partitionsel", "colm", "greats")

#: issue 16's targets: (label, kind of method, metric, bound)
TARGETS = (
    ("time vs random_4b", "gradient", "x_random_4b", 0.70),
    ("time vs floor", "gradient", "x_floor", 1.15),
    ("gradient features vs pool forward", "gradient", "features_x_forward", 0.20),
    ("time vs floor", "heuristic", "x_floor", 1.05),
    ("peak memory vs random_4b", "gradient", "peak_x_random_4b", 1.00),
    ("peak memory vs random_4b", "heuristic", "peak_x_random_4b", 1.00),
    ("reweighting vs train step", "reweighting", "reweight_x_train", 0.15),
)


# --------------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------------


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Clock:
    """Wall and process CPU seconds of named phases."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _sync()
        w, c = _WALL(), _CPU()
        try:
            yield
        finally:
            _sync()
            self.wall[name] = self.wall.get(name, 0.0) + _WALL() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + _CPU() - c

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Book ``seconds`` timed inside phase ``src`` under ``dst`` instead (both clocks)."""
        for d in (self.wall, self.cpu):
            d[src] = d.get(src, 0.0) - seconds
            d[dst] = d.get(dst, 0.0) + seconds

    def add(self, name: str, seconds: float) -> None:
        """A sub-phase timed inside the library (``time.perf_counter``: CPU seconds under ``--clock cpu``)."""
        self.wall[name] = self.wall.get(name, 0.0) + seconds
        self.cpu[name] = self.cpu.get(name, 0.0) + seconds


def tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak extra tensor memory (MiB) while ``fn`` runs: on CPU from the profiler's memory events, on
    CUDA ``max_memory_allocated`` above the memory allocated before."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        fn()
        torch.cuda.synchronize(DEVICE)
        return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
    """Parameters, their gradients (trainable ones) and the optimizer state, in MiB."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
    if optimizer is not None:
        for st in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        if not optimizer.state:  # before the first step: AdamW keeps two moments per parameter
            total += sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total / 2**20


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------------------------------
# the shared setup and one runner per method
# --------------------------------------------------------------------------------------------------


@dataclass
class Shared:
    """What every runner of one model shares: data, model, optimizer (and DoReMi's reference)."""

    cfg: Any
    tokenizer: Any
    mixture: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    reference: torch.nn.Module | None = None


def build_shared(cfg: Any, model: torch.nn.Module | None = None) -> Shared:
    from mixsel.data.build import load_mixture
    from mixsel.model import build_model, build_tokenizer

    tokenizer = build_tokenizer(cfg.model)
    mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = model if model is not None else build_model(cfg.model, tokenizer)
    model.to(DEVICE).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return Shared(cfg, tokenizer, mixture, model, optimizer)


def reference_of(shared: Shared) -> torch.nn.Module:
    """A frozen copy of the model: DoReMi's reference (its weights do not change the cost)."""
    if shared.reference is None:
        ref = copy.deepcopy(shared.model)
        ref.eval().requires_grad_(False)
        shared.reference = ref
    return shared.reference


class Runner:
    """One method's training steps, as ``mixsel train`` runs them (steps 1-4 of ``train.py``)."""

    def __init__(self, name: str, cfg: Any, shared: Shared) -> None:
        from mixsel.data.sampler import CandidateSampler
        from mixsel.registry import get_reweighter, get_selector
        from mixsel.step import OnlineSelector

        self.name, self.cfg, self.shared = name, cfg, shared
        domains = shared.mixture.domains
        self.num_domains = len(domains)
        from mixsel import bookkeeping

        self.selector = get_selector(cfg.selection.method, **cfg.selection.options)
        self.use_weights = bookkeeping.resolve_use_weights(self.selector, cfg.selection.use_weights)
        self.online = OnlineSelector(
            self.selector,
            cfg.selection.features,
            self.num_domains,
            seed=cfg.seed,
            diagnostics=cfg.selection.diagnostics,
            source_sizes=bookkeeping.source_sizes(shared.mixture.train.domain_ids, self.num_domains),
        )
        self.update_every = cfg.reweighting.update_every
        self.amortize = cfg.reweighting.amortize and self.update_every > 1
        self.reweighter = get_reweighter(
            cfg.reweighting.method,
            domains=domains,
            update_every=1 if self.amortize else self.update_every,
            **cfg.reweighting.options,
        )
        self.reference = reference_of(shared) if self.reweighter.needs_reference else None
        train = shared.mixture.train
        self.sampler = CandidateSampler(
            train.domain_ids, cfg.train.pool_size, seed=cfg.seed, num_domains=self.num_domains
        )
        self.step_id = 0

    @property
    def steps_per_rep(self) -> int:
        return int(self.update_every)

    def step(self, clock: Clock) -> None:
        from mixsel import bookkeeping
        from mixsel.features.loss import target_mask, token_losses

        cfg, model, opt = self.cfg, self.shared.model, self.shared.optimizer
        train_split, val_split = self.shared.mixture.train, self.shared.mixture.validation
        pad = self.shared.tokenizer.pad_token_id
        device = next(model.parameters()).device
        step = self.step_id
        self.step_id += 1
        k = cfg.train.batch_size
        with clock.phase("select"):
            weights = self.reweighter.weights
            sample_w, loss_w = bookkeeping.mixture_weights(self.reweighter)
            pool_ids = self.sampler.draw(sample_w)
            pool = train_split.collate(pool_ids, pad)
            fc = cfg.selection.features
            anchors = bookkeeping.draw_anchors(
                val_split.domain_ids, fc.val_anchors, seed=cfg.seed, step=step, sampling=fc.anchor_sampling
            )
            val_batch = val_split.collate(anchors, pad)
            result = self.online(
                model, pool, k, step=step, lr=cfg.train.lr, val_batch=val_batch, domain_weights=weights
            )
        fwd = result.metrics["time/forward"]
        clock.add("forward", fwd)
        clock.add("features", result.metrics["time/features"] - fwd)
        clock.add("solver", result.metrics["time/solver"])
        with clock.phase("train"):
            mine = result.selection
            chosen = mine.indices
            chosen_domains = pool["domain_ids"][chosen]
            w = bookkeeping.example_weights(mine, chosen_domains, use_weights=self.use_weights, loss_weights=loss_w)
            total_w = w.sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            losses = []
            mb = cfg.train.micro_batch_size
            stats_step = bookkeeping.is_stats_step(step, self.update_every, self.amortize)
            fc, rc = cfg.selection.features, cfg.reweighting
            grad_kw = {
                "source": fc.source,
                "modules": fc.modules,
                "projection_dim": rc.projection_dim,
                "seed": cfg.seed,
            }
            capture = None
            if self.reweighter.needs_grad and stats_step and rc.grad_rows == "trained":
                capture = bookkeeping.gradient_capture(model, **grad_kw)
            with capture if capture is not None else contextlib.nullcontext():
                for s in range(0, len(chosen), mb):
                    rows = chosen[s : s + mb]
                    batch = {key: pool[key][rows].to(device) for key in ("input_ids", "attention_mask", "labels")}
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    tok = token_losses(logits.float(), batch["labels"])
                    per_ex = tok.sum(1) / target_mask(batch["labels"]).sum(1).clamp_min(1)
                    if capture is not None:
                        capture.watch(per_ex)
                    (per_ex * w[s : s + mb].to(device)).sum().div(total_w.to(device)).backward()
                    losses.append(tok.detach().cpu())
            params = [p for p in model.parameters() if p.requires_grad]
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
        if capture is not None:  # the projection of the captured gradients is reweighting work
            clock.move("train", "reweight", capture.seconds)
        with clock.phase("reweight"):
            trained = {key: pool[key][chosen] for key in ("input_ids", "attention_mask", "labels")}
            stats = bookkeeping.domain_stats(
                chosen_domains,
                torch.cat(losses),
                self.num_domains,
                step=step,
                ref_losses=bookkeeping.reference_losses(self.reference, trained, mb)
                if self.reference is not None and stats_step
                else None,
                mask=target_mask(trained["labels"]),
            )
            if self.reweighter.needs_grad and stats_step:
                val_rows = bookkeeping.balanced_rows(val_split.domain_ids, self.num_domains, rc.val_per_domain)
                val_batch = None
                if bookkeeping.is_update_step(step, self.update_every) or self.amortize:
                    val_batch = val_split.collate(val_rows, pad)
                if capture is not None:
                    stats.grad = bookkeeping.captured_domain_gradients(
                        capture, trained, chosen_domains, self.num_domains, model=model, **grad_kw
                    )
                    if val_batch is not None:
                        stats.val_grad = bookkeeping.validation_gradient(model, val_batch, **grad_kw)
                else:
                    stats.grad, stats.val_grad = bookkeeping.domain_gradients(
                        model,
                        {key: pool[key] for key in ("input_ids", "attention_mask", "labels")},
                        pool["domain_ids"],
                        self.num_domains,
                        val_batch=val_batch,
                        **grad_kw,
                    )
            if stats_step:
                self.reweighter.update(stats)


class ForwardRunner:
    """The floor's second term: one plain no-grad forward of the pool (the same pools as ``random``)."""

    def __init__(self, cfg: Any, shared: Shared) -> None:
        from mixsel.data.sampler import CandidateSampler

        self.name, self.cfg, self.shared = "forward", cfg, shared
        train = shared.mixture.train
        self.sampler = CandidateSampler(
            train.domain_ids, cfg.train.pool_size, seed=cfg.seed, num_domains=len(shared.mixture.domains)
        )
        self.steps_per_rep = 1

    def step(self, clock: Clock) -> None:
        model = self.shared.model
        device = next(model.parameters()).device
        pool = self.shared.mixture.train.collate(self.sampler.draw(None), self.shared.tokenizer.pad_token_id)
        was = model.training
        model.eval()
        try:
            with clock.phase("forward"), torch.no_grad():
                model(
                    input_ids=pool["input_ids"].to(device),
                    attention_mask=pool["attention_mask"].to(device),
                    use_cache=False,
                )
        finally:
            model.train(was)


def run_reps(runners: dict[str, Any], reps: int, *, seed: int = 0, warmup: bool = True) -> dict[str, list[dict]]:
    """Interleaved repetitions: each rep runs every runner (``steps_per_rep`` steps) in a shuffled order.

    Returns per runner a list (one per rep) of ``{"wall": {phase: s/step}, "cpu": {...}}``.
    """
    order = list(runners)
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {name: [] for name in runners}
    for rep in range(reps + int(warmup)):
        rng.shuffle(order)
        for name in order:
            r = runners[name]
            clock = Clock()
            _sync()
            w0, c0 = _WALL(), _CPU()
            for _ in range(r.steps_per_rep):
                r.step(clock)
            _sync()
            wall_total, cpu_total = _WALL() - w0, _CPU() - c0
            if warmup and rep == 0:
                continue
            n = r.steps_per_rep
            wall = {k: v / n for k, v in clock.wall.items()}
            wall["total"] = wall_total / n
            cpu = {k: v / n for k, v in clock.cpu.items()}
            cpu["total"] = cpu_total / n
            out[name].append({"wall": wall, "cpu": cpu})
        log.info("rep %d/%d done (load %.2f)", rep + 1 - int(warmup), reps, load1())
    return out


def phases_of(sample: dict[str, float]) -> dict[str, float]:
    """forward / features / solver / other (sampling, collation) / train / reweight of one rep."""
    sel = sample.get("select", 0.0)
    fwd, feat, sol = sample.get("forward", 0.0), sample.get("features", 0.0), sample.get("solver", 0.0)
    return {
        "forward": fwd,
        "features": feat,
        "solver": sol,
        "other": max(sel - fwd - feat - sol, 0.0),
        "train": sample.get("train", 0.0),
        "reweight": sample.get("reweight", 0.0),
        "total": sample["total"],
    }


def peak_of(runner: Any) -> float:
    """Peak extra tensor memory (MiB) over one rep of the runner (its whole update window)."""

    def go() -> None:
        clock = Clock()
        for _ in range(runner.steps_per_rep):
            runner.step(clock)

    return tensor_peak_mb(go)


# --------------------------------------------------------------------------------------------------
# part 1: overhead of every method on the default config
# --------------------------------------------------------------------------------------------------


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    from mixsel.config import load_config

    methods = args.methods or (QUICK_METHODS if args.quick else list(METHODS))
    methods = [m for m in methods if m in METHODS]
    for must in ("random", "random_4b"):
        if must not in methods:
            methods.insert(0, must)
    base = load_config(DEFAULT_CONFIG, [f"train.threads={args.threads}", *args.override])
    shared = build_shared(base)
    runners: dict[str, Any] = {"forward": ForwardRunner(base, shared)}
    kinds = {}
    for name in methods:
        overrides, kind = METHODS[name]
        overrides = [o.format(pool=base.train.pool_size) for o in overrides]
        cfg = load_config(DEFAULT_CONFIG, [*args.override, *overrides])
        runners[name] = Runner(name, cfg, shared)
        kinds[name] = kind
    log.info("overhead: %d methods x %d reps, threads=%d", len(methods), args.reps, torch.get_num_threads())
    samples = run_reps(runners, args.reps, seed=args.seed)

    other = "wall" if args.clock == "cpu" else "cpu"

    def series(name: str, clock: str = args.clock) -> list[dict[str, float]]:
        return [phases_of(s[clock]) for s in samples[name]]

    fwd = [s["forward"] for s in series("forward")]
    floor = [r["total"] + f for r, f in zip(series("random"), fwd)]
    floor_other = [r["total"] + f["forward"] for r, f in zip(series("random", other), series("forward", other))]
    r4 = [s["total"] for s in series("random_4b")]
    r4_other = [s["total"] for s in series("random_4b", other)]

    state = state_mb(shared.model, shared.optimizer)
    peaks: dict[str, float] = {}
    if not args.no_memory:
        for name in ("forward", *methods):
            peaks[name] = round(peak_of(runners[name]), 1)
            log.info("peak %s: %.1f MiB", name, peaks[name])

    rows: dict[str, Any] = {}
    for name in methods:
        ph = series(name)
        ph_other = series(name, other)
        row: dict[str, Any] = {
            "kind": kinds[name],
            "s_per_step": {k: round(median([p[k] for p in ph]), 4) for k in (*PHASES, "total")},
            "x_floor": round(median([p["total"] / f for p, f in zip(ph, floor)]), 3),
            "x_random_4b": round(median([p["total"] / b for p, b in zip(ph, r4)]), 3),
            f"{other}_x_floor": round(median([p["total"] / f for p, f in zip(ph_other, floor_other)]), 3),
            f"{other}_x_random_4b": round(median([p["total"] / b for p, b in zip(ph_other, r4_other)]), 3),
            "features_x_forward": round(median([p["features"] / f for p, f in zip(ph, fwd)]), 3),
            "pool_forward_x_forward": round(median([p["forward"] / f for p, f in zip(ph, fwd)]), 3),
            "reweight_x_train": round(median([p["reweight"] / max(p["train"], 1e-9) for p in ph]), 3),
            "reps": len(ph),
        }
        if peaks:
            row["peak_mb"] = round(state + peaks[name], 1)
            row["peak_step_mb"] = peaks[name]
            row["peak_x_random_4b"] = round((state + peaks[name]) / (state + peaks["random_4b"]), 3)
        rows[name] = row
    summary = {
        "floor_s": round(median(floor), 4),
        "pool_forward_s": round(median(fwd), 4),
        "random_4b_s": round(median(r4), 4),
        "floor_x_random_4b": round(median([f / b for f, b in zip(floor, r4)]), 3),
        "state_mb": round(state, 1),
        "pool_forward_peak_step_mb": peaks.get("forward"),
    }
    return {
        "config": str(DEFAULT_CONFIG.relative_to(ROOT)),
        "clock": args.clock,
        "summary": summary,
        "methods": rows,
        "targets": check(rows),
    }


def check(rows: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, kind, metric, bound in TARGETS:
        for name, row in rows.items():
            if row["kind"] != kind or metric not in row:
                continue
            value = row[metric]
            out.append(
                {
                    "target": label,
                    "method": name,
                    "metric": metric,
                    "value": value,
                    "bound": bound,
                    "met": value <= bound,
                }
            )
    return out


# --------------------------------------------------------------------------------------------------
# part 2: scaling with the pool size and the model size
# --------------------------------------------------------------------------------------------------


def smollm_model(cfg: Any, lora: bool = True) -> tuple[torch.nn.Module, str]:
    """SmolLM2-135M (the converted folder, else a config-built model of its shape) with LoRA r=8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    if SMOLLM_DIR.exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(SMOLLM_DIR, dtype=torch.float32)
        source = str(SMOLLM_DIR.relative_to(ROOT))
    else:
        shape = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(shape)
        source = "config-built SmolLM2-135M shape (random weights; models/smollm2-135m-instruct is absent)"
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
    return model, source


def dominant(ph: dict[str, float]) -> str:
    return max(("forward", "features", "solver", "train"), key=lambda k: ph.get(k, 0.0))


def scale_points(
    args: argparse.Namespace, shared: Shared, label: str, sizes: list[int], extra: list[str]
) -> list[dict[str, Any]]:
    """For each pool size, one interleaved round of the scaling methods (+ memory), skipping too-slow points."""
    from mixsel.config import load_config

    points: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = {}
    for n in sizes:
        b = max(1, n // 4)
        runners: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name in SCALING_METHODS:
            if name in last:
                n0, t0 = last[name]
                predicted = t0 * (n / n0) ** 2
                if predicted > args.max_point_s:
                    skipped[name] = f"predicted {predicted:.0f} s/step > --max-point-s {args.max_point_s:.0f}"
                    continue
            overrides = [f"train.pool_size={n}", f"train.threads={args.threads}", *extra]
            overrides += (
                ["selection.method=random", f"train.batch_size={n}"]
                if name == "random_4b"
                else [
                    f"selection.method={name}",
                    f"train.batch_size={b}",
                ]
            )
            runners[name] = Runner(name, load_config(DEFAULT_CONFIG, [*args.override, *overrides]), shared)
        warm = n == sizes[0]  # the first size warms every method up (lazy imports, allocator)
        samples = run_reps(runners, args.scaling_reps, seed=args.seed + n, warmup=warm) if runners else {}
        for name in SCALING_METHODS:
            point: dict[str, Any] = {
                "model": label,
                "pool": n,
                "batch": n if name == "random_4b" else b,
                "method": name,
            }
            if name in skipped:
                points.append({**point, "skipped": skipped[name]})
                continue
            ph = [phases_of(s[args.clock]) for s in samples[name]]
            med = {k: round(median([p[k] for p in ph]), 4) for k in (*PHASES, "total")}
            select = med["forward"] + med["features"] + med["solver"] + med["other"]
            point.update({"s_per_step": med, "select_s": round(select, 4), "dominant": dominant(med)})
            if not args.no_memory:
                point["peak_step_mb"] = round(peak_of(runners[name]), 1)
                point["peak_mb"] = round(point["peak_step_mb"] + state_mb(shared.model, shared.optimizer), 1)
            last[name] = (n, med["total"])
            points.append(point)
            log.info("scaling %s n=%d %s: %s", label, n, name, json.dumps(point))
    return points


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    from mixsel.config import load_config

    base = load_config(DEFAULT_CONFIG, [f"train.threads={args.threads}", *args.override])
    shared = build_shared(base)
    pools = scale_points(args, shared, "embedded tiny Llama (4.2M, full)", args.pools, [])
    models = [
        {
            "model": "embedded tiny Llama (4.2M, full)",
            "params_m": round(sum(p.numel() for p in shared.model.parameters()) / 1e6, 1),
        }
    ]
    by_model = [p for p in pools if p["pool"] == args.model_pool]
    if not args.no_smollm:
        model, source = smollm_model(base)
        sm = build_shared(base, model=model)
        label = "SmolLM2-135M + LoRA r=8"
        by_model += scale_points(args, sm, label, [args.model_pool], [])
        models.append(
            {
                "model": label,
                "source": source,
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
            }
        )
    return {"pool_sweep": pools, "model_sweep": by_model, "models": models}


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def plot_overhead(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["methods"]
    names = [n for n in rows if rows[n]["kind"] != "floor"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.32 * len(names) + 2.2))
    y = list(range(len(names)))
    ax = axes[0]
    ax.barh([i - 0.2 for i in y], [rows[n]["x_floor"] for n in names], 0.4, label="x floor (random + pool forward)")
    ax.barh([i + 0.2 for i in y], [rows[n]["x_random_4b"] for n in names], 0.4, label="x random_4b")
    for bound, style in ((1.05, ":"), (1.15, "--"), (0.70, "-.")):
        ax.axvline(bound, color="k", ls=style, lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel("s/step ratio (targets: 0.70x random_4b, 1.15x / 1.05x floor)")
    ax.legend(fontsize=7)
    ax = axes[1]
    left = [0.0] * len(names)
    for phase in PHASES:
        vals = [rows[n]["s_per_step"][phase] for n in names]
        ax.barh(y, vals, left=left, label=phase)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(y)
    ax.set_yticklabels([])
    ax.invert_yaxis()
    ax.set_xlabel("s/step by phase (median)")
    ax.legend(fontsize=7)
    ax = axes[2]
    if all("peak_x_random_4b" in rows[n] for n in names):
        ax.barh(y, [rows[n]["peak_x_random_4b"] for n in names], color="tab:purple")
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("peak tensor memory / random_4b's (target <= 1)")
    ax.set_yticks(y)
    ax.set_yticklabels([])
    ax.invert_yaxis()
    meta = res.get("meta", {})
    fig.suptitle(
        f"issue 16 cost ratios, default config, {meta.get('threads')} threads, "
        f"load {meta.get('load_start')} -> {meta.get('load_end')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_scaling(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in res["pool_sweep"] if "s_per_step" in p]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in SCALING_METHODS:
        mine = [p for p in pts if p["method"] == name]
        if not mine:
            continue
        xs = [p["pool"] for p in mine]
        axes[0].plot(xs, [p["s_per_step"]["total"] for p in mine], "o-", label=f"{name} step")
        if name != "random_4b":
            axes[0].plot(xs, [p["select_s"] for p in mine], "x:", label=f"{name} selection")
        if all("peak_mb" in p for p in mine):
            axes[1].plot(xs, [p["peak_mb"] for p in mine], "o-", label=name)
    for ax, lab in ((axes[0], "s/step"), (axes[1], "peak tensor MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pool size n (batch n/4; random_4b trains on n)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    ms = [p for p in res["model_sweep"] if "s_per_step" in p]
    labels = [f"{p['method']}\n{p['model'].split(' (')[0].split(' +')[0]}" for p in ms]
    left = [0.0] * len(ms)
    for phase in PHASES:
        vals = [p["s_per_step"][phase] for p in ms]
        axes[2].barh(range(len(ms)), vals, left=left, label=phase)
        left = [a + b for a, b in zip(left, vals)]
    axes[2].set_yticks(range(len(ms)))
    axes[2].set_yticklabels(labels, fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("s/step by phase, pool 64 (log)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------


def meta_of(args: argparse.Namespace, load_start: float, t0: float) -> dict[str, Any]:
    return {
        "command": " ".join(["python", *sys.argv]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": load1(),
        "wall_s": round(time.time() - t0, 1),
        "reps": args.reps,
        "quick": args.quick,
        "clock": args.clock,
        "device": str(DEVICE),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 reps, pools 32-128, no SmolLM2 (about 3 minutes)")
    ap.add_argument("--part", choices=("all", "overhead", "scaling"), default="all")
    ap.add_argument("--methods", nargs="*", help="overhead methods (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 6; --quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="seconds the ratios use; cpu (process time, best with --threads 1) resists a loaded machine",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pools", type=int, nargs="*", default=None, help="pool sizes of the scaling sweep")
    ap.add_argument("--model-pool", type=int, default=64, help="pool size of the model-size sweep")
    ap.add_argument("--scaling-reps", type=int, default=1)
    ap.add_argument("--max-point-s", type=float, default=60.0, help="skip scaling points predicted slower")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiler memory passes")
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M point")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (CUDA when available)")
    ap.add_argument("--override", nargs="*", default=[], help="a.b=c overrides of every config (tests)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 6)
    args.pools = args.pools or ([32, 64, 128] if args.quick else [32, 64, 128, 256, 512, 1024])
    args.no_smollm = args.no_smollm or args.quick
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("mixsel", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    global DEVICE
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    DEVICE = torch.device(auto if args.device == "auto" else args.device)
    if args.clock == "cpu" and DEVICE.type == "cuda":
        raise SystemExit("--clock cpu measures CPU work; on a GPU use --clock wall")
    if args.clock == "cpu":  # every timing, the library's own included, reports process CPU seconds
        time.perf_counter = time.process_time  # type: ignore[assignment]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "overhead"):
        t0, l0 = time.time(), load1()
        res = overhead(args)
        res = {"meta": meta_of(args, l0, t0), **res}
        (args.out / "cost.json").write_text(json.dumps(res, indent=1))
        plot_overhead(res, args.out / "cost.png")
        print(format_table(res))
        print(format_targets(res))
    if args.part in ("all", "scaling"):
        t0, l0 = time.time(), load1()
        res = scaling(args)
        res = {"meta": meta_of(args, l0, t0), **res}
        (args.out / "cost_scaling.json").write_text(json.dumps(res, indent=1))
        plot_scaling(res, args.out / "cost_scaling.png")
        print(format_scaling(res))


def format_table(res: dict[str, Any]) -> str:
    other = "wall" if res["clock"] == "cpu" else "cpu"
    head = (
        f"| method | s/step | x floor | x random_4b | x floor ({other}) | pool fwd | features | solver | train "
        "| reweight | peak MiB | peak x random_4b |"
    )
    lines = [head, "|" + "---|" * 12]
    for name, r in res["methods"].items():
        r = {**r, "other_x_floor": r[f"{other}_x_floor"]}
        s = r["s_per_step"]
        lines.append(
            f"| {name} | {s['total']:.3f} | {r['x_floor']:.2f} | {r['x_random_4b']:.2f} | {r['other_x_floor']:.2f} | "
            f"{s['forward']:.3f} | "
            f"{s['features']:.3f} | {s['solver']:.3f} | {s['train']:.3f} | {s['reweight']:.3f} | "
            f"{r.get('peak_mb', float('nan')):.0f} | {r.get('peak_x_random_4b', float('nan')):.2f} |"
        )
    met = [t for t in res["targets"] if not t["met"]]
    lines.append(f"\nfloor {res['summary']}; missed targets: {len(met)} of {len(res['targets'])}")
    lines += [f"  MISSED {t['target']} {t['method']}: {t['value']} > {t['bound']}" for t in met]
    return "\n".join(lines)


def format_targets(res: dict[str, Any]) -> str:
    """docs/cost.md's table: each method's ratios next to its targets (met / missed)."""
    by: dict[str, dict[str, Any]] = {}
    for t in res["targets"]:
        by.setdefault(t["method"], {})[t["metric"]] = t
    lines = [
        "| method | kind | x floor | x random_4b | features / pool forward | peak x random_4b | reweight / train |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(name: str, row: dict[str, Any], metric: str) -> str:
        if metric not in row:
            return "-"
        t = by.get(name, {}).get(metric)
        mark = "" if t is None else (" (met)" if t["met"] else f" (**missed**, <= {t['bound']:g})")
        return f"{row[metric]:.2f}{mark}"

    for name, row in res["methods"].items():
        if row["kind"] == "floor":
            continue
        feat = cell(name, row, "features_x_forward") if row["kind"] in ("gradient", "option") else "-"
        rew = cell(name, row, "reweight_x_train") if row["kind"] == "reweighting" else "-"
        lines.append(
            f"| {name} | {row['kind']} | {cell(name, row, 'x_floor')} | {cell(name, row, 'x_random_4b')} | {feat} | "
            f"{cell(name, row, 'peak_x_random_4b')} | {rew} |"
        )
    return "\n".join(lines)


def format_scaling(res: dict[str, Any]) -> str:
    lines = ["| model | pool | method | s/step | selection s | dominant | peak MiB |", "|" + "---|" * 7]
    for p in res["pool_sweep"] + [q for q in res["model_sweep"] if q not in res["pool_sweep"]]:
        if "skipped" in p:
            lines.append(f"| {p['model']} | {p['pool']} | {p['method']} | skipped: {p['skipped']} | | | |")
            continue
        lines.append(
            f"| {p['model']} | {p['pool']} | {p['method']} | {p['s_per_step']['total']:.3f} | {p['select_s']:.3f} | "
            f"{p['dominant']} | {p.get('peak_mb', float('nan')):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
