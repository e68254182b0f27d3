"""Regenerate every evidence experiment of ``docs/results.md`` with one command.

    python benchmarks/run_experiments.py                  # everything (hours of CPU on 2 cores)
    python benchmarks/run_experiments.py --quick          # 1 seed, 20 steps: a smoke pass
    python benchmarks/run_experiments.py --only exp4_reweighting --budget-minutes 30
    python benchmarks/run_experiments.py --plots-only     # re-draw plots and summaries from results

Each experiment is a folder of ``benchmarks/experiments/`` holding one or more ``mixsel compare``
YAML files that share one output folder (each file is also runnable on its own with
``mixsel compare --config FILE``). This script splits the files into (run, seed) tasks, runs up to
``--jobs`` of them at once as ``mixsel compare`` subprocesses (a run referring to ``{run:NAME}``
waits for NAME), in the order of ``PLAN`` (the headline runs first, so a time budget cuts the least
important work), and copies the light files of every finished run (``result.json``,
``metrics.jsonl``, ``config.yaml``, the exact-match ``generations.jsonl``; never checkpoints) from the work folder to
``benchmarks/results/experiments/<experiment>/<run>/seed<s>/``. Then it writes per experiment
``summary.json`` / ``summary.md`` (mean ± sample std over the seeds that finished), refills the
marked table blocks of ``docs/results.md`` from them (``fill_doc``; the prose is left alone) and calls
``plot_experiments.py``, which reads those results only. Finished runs are skipped, so an
interrupted pass continues. Several passes can share one ``--work`` folder (e.g. a second one with
its own ``--jobs`` and budget while the first finishes its last runs): each task is claimed with a
lock file (``<work>/locks``), a task a live pass holds is left to it, and a lock whose processes are
gone is taken over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "benchmarks" / "experiments"
RESULTS = ROOT / "benchmarks" / "results" / "experiments"
LIGHT_FILES = ("result.json", "metrics.jsonl", "config.yaml", "generations.jsonl")  # the last: ~90 KB for 400 prompts
DOC = ROOT / "docs" / "results.md"  # its marked table blocks are refilled from the summaries

# (compare file relative to EXPERIMENTS, seeds, runs or None for all) in priority order: the cheap
# and headline runs first, so that a time budget (--budget-minutes) cuts the least important work.
PLAN: list[tuple[str, list[int], list[str] | None]] = [
    ("exp1_equal_batch/compare.yaml", [0], None),
    ("exp1_equal_batch/compare.yaml", [1, 2], ["random", "stratified", "big_loss"]),
    ("exp4_reweighting/compare.yaml", [0], ["uniform", "doremi", "dograph"]),
    ("exp1_equal_batch/compare_more.yaml", [0], ["middle_ppl", "least_confidence", "completion_length"]),
    ("exp1_equal_batch/compare.yaml", [1], ["partitionsel", "colm", "greats", "random_4b"]),
    ("exp4_reweighting/compare.yaml", [0], None),
    ("exp6_finetune/compare.yaml", [0], None),
    ("exp1_equal_batch/compare_more.yaml", [0], None),
    ("exp1c_natural_mixture/compare.yaml", [0], None),
    ("exp3_colm_ablation/compare.yaml", [0], None),
    ("exp1_equal_batch/compare.yaml", [2], None),
    ("exp1b_pool_2b/compare.yaml", [0], None),
    ("exp5_overhead/compare.yaml", [0], None),
    # issue 17's regimes: a 10x longer pre-training run (B) and SmolLM2-135M + LoRA fine-tuning (A)
    ("exp8_smollm2_lora/compare.yaml", [0], ["base", "random", "partitionsel", "stratified"]),
    ("exp7_pretrain_long/compare.yaml", [0], None),
    ("exp8_smollm2_lora/compare.yaml", [1, 2], ["random", "partitionsel"]),  # the headline pair, 3 seeds
    ("exp8_smollm2_lora/compare.yaml", [1, 2], ["stratified"]),  # its control (same budgets, random picks)
    # budgets or gradient matching? both under pool-proportional (largest-remainder) budgets
    ("exp8_smollm2_lora/compare.yaml", [0], ["partitionsel_lr", "stratified_lr"]),
    ("exp8_smollm2_lora/compare.yaml", [0], None),
    ("exp7_pretrain_long/compare.yaml", [1, 2], None),
    ("exp8_smollm2_lora/compare.yaml", [1, 2], ["random_4b", "colm"]),
    ("exp8_smollm2_lora/compare.yaml", [1, 2], ["greats", "per_domain", "gradmatch"]),
    # seeds 1 and 2 of everything else, in the same priority order
    ("exp4_reweighting/compare.yaml", [1, 2], None),
    ("exp1_equal_batch/compare_more.yaml", [1, 2], None),
    ("exp1c_natural_mixture/compare.yaml", [1, 2], None),
    ("exp6_finetune/compare.yaml", [1, 2], None),
    ("exp3_colm_ablation/compare.yaml", [1, 2], None),
    ("exp1b_pool_2b/compare.yaml", [1, 2], None),
]

# Experiments whose point is timing: each of their runs starts only when nothing else is running, and
# nothing else starts while it runs (the other experiments run two at a time, so their s/step are
# comparable within a seed but carry the contention of a neighbour).
EXCLUSIVE = {"exp5_overhead"}

TIME_KEYS = ("time/forward", "time/features", "time/solver", "time/train", "time/reweight", "time/step")


@dataclass
class Task:
    """One (run, seed) of one compare file."""

    spec_path: Path
    experiment: str
    run: str
    seed: int
    deps: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.experiment, self.run, self.seed)


def _refs(overrides: list[str]) -> list[str]:
    names = []
    for item in overrides:
        rest = str(item)
        while "{run:" in rest:
            start = rest.index("{run:") + 5
            end = rest.index("}", start)
            names.append(rest[start:end])
            rest = rest[end + 1 :]
    return names


def plan_tasks(
    plan: list[tuple[str, list[int], list[str] | None]], experiments: Path, only: set[str] | None
) -> list[Task]:
    """The (run, seed) tasks of ``plan`` in priority order (a task appears once)."""
    tasks: list[Task] = []
    seen: set[tuple[str, str, int]] = set()
    for rel, seeds, names in plan:
        path = experiments / rel
        experiment = Path(rel).parent.name
        if only and experiment not in only:
            continue
        spec = yaml.safe_load(path.read_text())
        for seed in seeds:
            if seed not in (spec.get("seeds") or [0]):
                continue
            for run, overrides in spec["runs"].items():
                if names is not None and run not in names:
                    continue
                task = Task(path, experiment, run, seed, _refs(overrides or []))
                if task.key not in seen:
                    seen.add(task.key)
                    tasks.append(task)
    return tasks


def _task_yaml(task: Task, work: Path, extra: list[str]) -> Path:
    """A one-run compare file for ``task`` (its dependencies listed first, already finished).

    ``extra`` overrides come after each run's own, so they win (e.g. the steps of ``--quick``).
    """
    spec = yaml.safe_load(task.spec_path.read_text())
    needed, todo = set(), list(task.deps)
    while todo:  # the dependencies of the dependencies too (doremi_two_stage -> doremi -> uniform)
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_refs(spec["runs"][name] or []))
    order = [name for name in spec["runs"] if name in needed] + [task.run]  # as listed: references point back
    runs = {name: list(spec["runs"][name] or []) + list(extra) for name in order}
    base = spec.get("base")
    out = {
        "base": str((task.spec_path.parent / base).resolve()) if base else None,
        "overrides": list(spec.get("overrides") or []),
        "seeds": [task.seed],
        "output_dir": str(work / task.experiment),
        "runs": runs,
    }
    if out["base"] is None:
        del out["base"]
    target = work / "tasks" / f"{task.experiment}__{task.run}__seed{task.seed}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(out, sort_keys=False))
    return target


def copy_light(work: Path, results: Path, task: Task) -> bool:
    """Copy the light files of a finished run to the results folder; False if it did not finish."""
    src = work / task.experiment / task.run / f"seed{task.seed}"
    if not (src / "result.json").exists():
        return False
    dst = results / task.experiment / task.run / f"seed{task.seed}"
    dst.mkdir(parents=True, exist_ok=True)
    for name in LIGHT_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def _lock_path(work: Path, task: Task) -> Path:
    return work / "locks" / f"{task.experiment}__{task.run}__seed{task.seed}.lock"


def claimed_elsewhere(work: Path, task: Task) -> bool:
    """Whether a live process holds ``task``'s lock (its runner, or the run it started)."""
    try:
        pids = [int(x) for x in _lock_path(work, task).read_text().split()]
    except (OSError, ValueError):
        return False
    return any(pid != os.getpid() and _alive(pid) for pid in pids)


def claim(work: Path, task: Task) -> bool:
    """Take ``task`` for this runner: create its lock file (``work/locks``) holding this process's pid.

    Several runners can share a work folder (e.g. one started with a new budget while another
    finishes its last runs): a task whose lock a live process holds is left to it. A lock whose
    processes are all gone (a runner killed with its runs) is stale and taken over.
    """
    path = _lock_path(work, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if claimed_elsewhere(work, task):
                return False
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        return True
    return False


def run_tasks(tasks: list[Task], args: argparse.Namespace, extra: list[str]) -> dict[str, list[str]]:
    """Run ``tasks`` with up to ``args.jobs`` subprocesses; return finished / failed / cut / elsewhere keys.

    A task another runner is running (:func:`claim`) is not started here; tasks that depend on it wait
    for its result.
    """
    work = Path(args.work)
    results = Path(args.results)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.setdefault("MIXSEL_CACHE", str(work / "cache"))
    deadline = time.monotonic() + 60 * args.budget_minutes if args.budget_minutes else None
    pending = [
        t
        for t in tasks
        if not copy_light(work, results, t)
        and not (results / t.experiment / t.run / f"seed{t.seed}" / "result.json").exists()
    ]
    done = {t.key for t in tasks if t not in pending}
    failed: set[tuple[str, str, int]] = set()
    running: dict[tuple[str, str, int], tuple[subprocess.Popen, Task, float]] = {}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    report: dict[str, list[str]] = {"finished": [], "failed": [], "cut": [], "elsewhere": []}
    elsewhere: dict[tuple[str, str, int], Task] = {}  # run by another runner: its result is awaited

    def awaits_elsewhere() -> bool:  # a pending task depends on a run another runner has
        return any((t.experiment, d, t.seed) in elsewhere for t in pending for d in t.deps)

    while pending or running or awaits_elsewhere():
        for key, task in list(elsewhere.items()):
            if copy_light(work, results, task):
                del elsewhere[key]
                done.add(key)
            elif not claimed_elsewhere(work, task):
                del elsewhere[key]
                failed.add(key)  # the other runner stopped without a result
        for key, (proc, task, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            _lock_path(work, task).unlink(missing_ok=True)
            ok = proc.returncode == 0 and copy_light(work, results, task)
            (done if ok else failed).add(key)
            report["finished" if ok else "failed"].append("/".join(map(str, key)))
            print(
                f"[{'done' if ok else 'FAILED'}] {'/'.join(map(str, key))} in {time.monotonic() - start:.0f} s",
                flush=True,
            )
        out_of_time = deadline is not None and time.monotonic() > deadline
        while pending and len(running) < args.jobs and not out_of_time:
            ready = [t for t in pending if all((t.experiment, d, t.seed) in done for d in t.deps)]
            blocked = [t for t in pending if any((t.experiment, d, t.seed) in failed for d in t.deps)]
            for t in blocked:
                pending.remove(t)
                failed.add(t.key)
                report["failed"].append("/".join(map(str, t.key)) + " (dependency failed)")
            if not ready:
                break
            task = ready[0]
            alone = task.experiment in EXCLUSIVE
            if any(t.experiment in EXCLUSIVE for _, t, _ in running.values()) or (alone and running):
                break  # a timing run waits for an empty machine, and keeps it empty
            pending.remove(task)
            if not claim(work, task):
                elsewhere[task.key] = task
                report["elsewhere"].append("/".join(map(str, task.key)))
                print(f"[elsewhere] {'/'.join(map(str, task.key))} (another runner has it)", flush=True)
                continue
            cfg = _task_yaml(task, work, extra)
            log = open(work / "logs" / f"{cfg.stem}.log", "w")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "mixsel", "compare", "--config", str(cfg), "--quiet"]
            print(f"[start] {'/'.join(map(str, task.key))}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            with open(_lock_path(work, task), "a") as fh:  # the run itself holds the task too
                fh.write(f"{proc.pid}\n")
            running[task.key] = (proc, task, time.monotonic())
        if out_of_time and pending:
            report["cut"].extend("/".join(map(str, t.key)) for t in pending)
            pending = []
        time.sleep(2)
    return report


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _overhead(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per step of each ``time/*`` split (steps after the first, which warms up)."""
    out = {}
    for key in TIME_KEYS:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r.get("step", 0) > 1]
        if vals:
            out[key] = statistics.fmean(vals)
    for key in ("select/conflicts_random", "select/grad_mismatch", "select/grad_mismatch_random"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]  # not NaN
        if vals:
            out[key.removeprefix("select/")] = statistics.fmean(vals)
    return out


def _picks(rows: list[dict]) -> dict[str, float]:
    """Domain -> mean share of the trained batch over the steps (``select/frac/<domain>``)."""
    keys = sorted({k for r in rows for k in r if k.startswith("select/frac/")})
    out = {}
    for key in keys:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[key.removeprefix("select/frac/")] = statistics.fmean(vals)
    return out


def _per_domain_table(summary: dict[str, dict], field: str, *, every_run: bool) -> str:
    """A run x domain table of ``summary[run][field]`` (``{domain: value}``); runs without the field
    get a row of ``-`` when ``every_run``, no row otherwise."""
    doms = sorted({d for n in summary for d in summary[n].get(field, {})})
    lines = ["| run | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for n in summary:
        vals = summary[n].get(field, {})
        if vals or every_run:
            lines.append(f"| {n} | " + " | ".join(f"{vals[d]:.3f}" if d in vals else "-" for d in doms) + " |")
    return "\n".join(lines) if doms else ""


def picks_table(summary: dict[str, dict]) -> str:
    """Which domains each run trained on: the mean share of each domain in the chosen batches
    (mean over steps, then over seeds). ``random`` shows the pool's own proportions."""
    return _per_domain_table(summary, "per_domain_picks", every_run=False)


def generation_table(summary: dict[str, dict]) -> str:
    """What the exact-match generations look like, per scored domain (test split, mean over seeds):
    the share that state their answer on the training responses' ``####`` line (or in a ``\\boxed{}``),
    the share that ended within ``eval.max_new_tokens``, and the mean number of generated tokens."""
    from mixsel.compare import format_cell

    kinds = (("stated", "answer line", "{:.2f}"), ("finished", "ended", "{:.2f}"), ("tokens", "tokens", "{:.0f}"))
    runs = [n for n in summary if any(k.startswith("generation/") for k in summary[n])]
    if not runs:
        return ""
    doms = sorted({k.rsplit("/", 1)[1] for n in runs for k in summary[n] if k.startswith("generation/")})
    heads = [f"{title}: {d}" for _, title, _ in kinds for d in doms]
    lines = ["| run | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for n in runs:
        cells = [format_cell(summary[n], f"generation/{kind}/{d}", fmt) for kind, _, fmt in kinds for d in doms]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(summary: dict[str, dict]) -> str:
    """Seconds per step split into pool forward / features / solver / train / reweighting."""
    from mixsel.compare import format_cell

    timed = [n for n in summary if "time/step" in summary[n]]
    lines = [
        "| run | pool forward (s/step) | features, incl. forward (s/step) | solver (s/step) "
        "| train (s/step) | reweighting (s/step) | total (s/step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in timed:
        cells = [format_cell(summary[n], k, "{:.3f}") for k in TIME_KEYS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if timed else ""


def conflicts_table(summary: dict[str, dict]) -> str:
    """Conflicting pairs per step in the selected batch vs a random batch of the same pool."""
    from mixsel.compare import format_cell

    conf = [n for n in summary if "conflicts_random" in summary[n]]
    mismatch = any("grad_mismatch" in summary[n] for n in conf)
    head = "| run | conflicts, selected | conflicts, random batch of the same pool |"
    rule = "|---|---|---|"
    if mismatch:  # ||mean selected gradient - mean pool gradient||^2 / ||mean pool gradient||^2
        head += " gradient mismatch to the pool, selected | gradient mismatch, random batch |"
        rule += "---|---|"
    lines = [head, rule]
    for n in conf:
        keys = ["conflicts", "conflicts_random"]
        fmts = ["{:.1f}", "{:.1f}"]
        if mismatch:
            keys += ["grad_mismatch", "grad_mismatch_random"]
            fmts += ["{:.3f}", "{:.3f}"]
        cells = [format_cell(summary[n], k, f) for k, f in zip(keys, fmts)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if conf else ""


def domain_table(summary: dict[str, dict]) -> str:
    """Final validation loss per domain (mean over seeds)."""
    return _per_domain_table(summary, "per_domain_val", every_run=True)


def format_extra_tables(summary: dict[str, dict]) -> str:
    """Markdown tables of the per-step time split, conflicts (selected vs random) and per-domain loss."""
    parts = [t for t in (time_table(summary), conflicts_table(summary), domain_table(summary)) if t]
    return "\n\n".join(parts) + "\n"


def paired_table(summary: dict[str, dict], base: str, *, metric: str = "val") -> str:
    """Per-seed differences of the final mean validation loss (``metric="val"``) or of the mean
    exact match (``metric="em"``) against run ``base`` (same seed).

    Pairing by seed removes what the runs of one seed share (the initialisation, the pools, in
    fine-tuning the pre-trained checkpoint), so small but consistent effects show.
    """
    em = metric == "em"
    key, label, better = ("per_seed_em", "exact match", "higher") if em else ("per_seed_val", "val loss", "lower")
    ref = summary.get(base, {}).get(key, {})
    lines = [
        f"| run | Δ {label} vs {base} (mean ± std over seeds) | {better} than {base} in | per seed |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        mine = row.get(key, {})
        seeds = sorted(set(mine) & set(ref))
        if name == base or not seeds:
            continue
        diffs = [mine[s] - ref[s] for s in seeds]
        spread = f" ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""
        wins = sum(d > 0 for d in diffs) if em else sum(d < 0 for d in diffs)
        lines.append(
            f"| {name} | {statistics.fmean(diffs):+.3f}{spread} | {wins} of {len(diffs)} seeds | "
            + ", ".join(f"{d:+.3f}" for d in diffs)
            + " |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def _paired_em(summary: dict[str, dict], base: str) -> str:
    return paired_table(summary, base, metric="em")


def _exact_match_table(summary: dict[str, dict]) -> str:
    from mixsel.compare import format_exact_match

    return format_exact_match(summary)


TABLES = {
    "main": None,
    "time": time_table,
    "conflicts": conflicts_table,
    "domains": domain_table,
    "paired": paired_table,
    "paired_em": _paired_em,
    "exact_match": _exact_match_table,
    "generation": generation_table,
    "picks": picks_table,
}
_MARK = re.compile(r"(<!-- table (\S+?)/(\w+)(?::(\w+))? -->\n)(.*?)(<!-- end table -->)", re.S)


def fill_doc(text: str, summaries: dict[str, dict]) -> str:
    """Replace every ``<!-- table EXPERIMENT/KIND -->`` ... ``<!-- end table -->`` block of ``text``.

    KIND is one of ``main`` (the compare table), ``time``, ``conflicts``, ``domains``,
    ``exact_match`` (per scored domain), ``generation`` (answer format, ends and lengths of the
    exact-match generations), ``picks`` (domain shares of the trained batches),
    ``paired:BASE`` / ``paired_em:BASE`` (per-seed differences of the validation loss / exact
    match against run BASE). The prose
    around the blocks is left alone, so ``docs/results.md`` keeps its analysis while its tables
    always come from the results.
    """
    from mixsel.compare import format_table

    def table(match: re.Match) -> str:
        experiment, kind, arg = match.group(2), match.group(3), match.group(4)
        if kind not in TABLES:
            raise ValueError(f"unknown table kind {kind!r} in {match.group(1).strip()}; valid: {sorted(TABLES)}")
        summary = summaries.get(experiment)
        if summary is None:
            body = (
                f"*(no results for {experiment} yet: run `python benchmarks/run_experiments.py --only {experiment}`)*"
            )
        else:
            fn = TABLES[kind]
            if kind in ("paired", "paired_em"):
                if not arg:
                    raise ValueError(f"{match.group(1).strip()}: a paired table names its baseline, e.g. paired:random")
                body = fn(summary, arg)
            else:
                body = format_table(summary) if fn is None else fn(summary)
        return f"{match.group(1)}{body.rstrip()}\n{match.group(6)}"

    return _MARK.sub(table, text)


def summarize_results(results: Path, experiments: Path) -> dict[str, dict]:
    """Write ``summary.json`` / ``summary.md`` of every experiment from the copied results."""
    from mixsel.compare import _metric, _with_run_means, format_table, summarize

    summaries = {}
    for folder in sorted(p for p in experiments.iterdir() if p.is_dir()):
        order: list[str] = []
        for spec_path in sorted(folder.glob("*.yaml")):
            for run in yaml.safe_load(spec_path.read_text())["runs"]:
                if run not in order:
                    order.append(run)
        by_run: dict[str, list[dict]] = {}
        extras: dict[str, dict[str, dict[str, float]]] = {}
        picks: dict[str, dict[str, float]] = {}
        for run in order:
            seeds = sorted((results / folder.name / run).glob("seed*/result.json"))
            if not seeds:
                continue
            by_run[run] = [_with_run_means(json.loads(p.read_text()), p.parent) for p in seeds]
            rows = [_metrics(p.parent) for p in seeds]
            per_seed = [_overhead(r) for r in rows]
            seed_picks = [_picks(r) for r in rows]
            picks[run] = {
                d: statistics.fmean(sp[d] for sp in seed_picks)
                for d in seed_picks[0]
                if all(d in sp for sp in seed_picks)
            }
            keys = {k for d in per_seed for k in d}
            extras[run] = {
                k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                for k in sorted(keys)
                if (v := [d[k] for d in per_seed if k in d])
            }
        if not by_run:
            continue
        summary = summarize(by_run)
        for run, row in summary.items():
            row.update(extras.get(run, {}))
            row["per_seed_val"] = {
                str(r.get("seed", i)): r["val/loss_mean"] for i, r in enumerate(by_run[run]) if "val/loss_mean" in r
            }
            row["per_seed_em"] = {  # mean exact match over the scored domains (test split)
                str(r.get("seed", i)): em
                for i, r in enumerate(by_run[run])
                if (em := _metric(r, "exact_match")) is not None
            }
            if picks.get(run):
                row["per_domain_picks"] = picks[run]
            row["per_domain_val"] = {
                k.split("/", 2)[2]: statistics.fmean(r[k] for r in by_run[run])
                for k in by_run[run][0]
                if k.startswith("val/loss/") and all(k in r for r in by_run[run])
            }
        out = results / folder.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(format_table(summary) + "\n\n" + format_extra_tables(summary))
        summaries[folder.name] = summary
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides applied to every run (after its own)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only, 20 steps, eval every 10")
    parser.add_argument("--only", nargs="*", default=None, help="experiment folder names to run")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once (default 2)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no task after this")
    parser.add_argument("--work", default="/tmp/mixsel-experiments", help="run folders (with checkpoints)")
    parser.add_argument("--results", default=str(RESULTS), help="where the light results are copied")
    parser.add_argument("--experiments", default=str(EXPERIMENTS), help="folder of experiment folders")
    parser.add_argument("--plots-only", action="store_true", help="only summaries and plots from results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs} must be >= 1")
    extra = list(args.overrides)
    plan = PLAN
    if args.quick:
        extra += ["train.max_steps=20", "eval.every=10", "train.warmup_steps=2"]
        plan = [(rel, [s for s in seeds if s == 0], names) for rel, seeds, names in PLAN]
    experiments = Path(args.experiments)
    if experiments.resolve() != EXPERIMENTS.resolve():  # a custom folder: every file, its own seeds
        plan = []
        for p in sorted(experiments.glob("*/*.yaml")):
            seeds = yaml.safe_load(p.read_text()).get("seeds") or [0]
            plan.append((str(p.relative_to(experiments)), [0] if args.quick else list(seeds), None))
    t0 = time.monotonic()
    if not args.plots_only:
        tasks = plan_tasks(plan, experiments, set(args.only) if args.only else None)
        report = run_tasks(tasks, args, extra)
        print(json.dumps({k: v for k, v in report.items() if v}, indent=2))
    summaries = summarize_results(Path(args.results), experiments)
    if DOC.exists() and Path(args.results).resolve() == RESULTS.resolve():
        DOC.write_text(fill_doc(DOC.read_text(), summaries))
        print(f"tables: {DOC}")
    if not args.no_plots:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_experiments import plot_all

        for path in plot_all(Path(args.results)):
            print(f"plot: {path}")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
