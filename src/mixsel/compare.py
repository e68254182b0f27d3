"""``mixsel compare``: several methods on the same data, steps and seeds; a table and plots.

A compare file is YAML::

    base: default.yaml            # an experiment YAML, relative to this file (or omitted: defaults)
    overrides: [train.max_steps=60]   # applied to every run
    seeds: [0, 1]
    output_dir: runs/compare
    runs:                          # name -> overrides of that run
      random: [selection.method=random]
      stratified: [selection.method=stratified]
      doremi: [reweighting.method=doremi, "reweighting.reference_model={run:random}/final"]

``{run:NAME}`` stands for the folder of an earlier run with the same seed (e.g. DoReMi's reference
model is the random-selection run trained on the natural mixture). Each run writes its own folder
``<output_dir>/<name>/seed<s>/`` (config, metrics, result); the summary goes to
``<output_dir>/summary.json`` and ``summary.md``, plots to ``<output_dir>/plots/``. Below the main
table come exact match per scored domain and each run's wall seconds by part (data, model, train,
eval, total: ``result.json``'s ``time``; ``-`` for a run finished before it was recorded).

Paths: ``base``, ``output_dir`` and relative paths in the file's overrides resolve against the compare
file's folder; overrides given on the command line against the working directory. Without
``output_dir``, runs go to ``runs/compare`` under the working directory.

Reruns: a run whose ``result.json`` exists is skipped only when its config is unchanged (every field
but those in ``mixsel.config.RESULT_SAFE_FIELDS``); a changed run, and every run that refers to a
rerun one through ``{run:NAME}``, is trained again (its folder replaced). An interrupted run resumes
from its checkpoint when the config is unchanged, and starts again otherwise. So an interrupted or
edited comparison continues with the least work, and the table never shows stale results.

Jobs: the runs go one at a time, in file order, seeds inner, in this process (each with
``train.threads`` threads); for parallel runs, start several ``mixsel compare`` processes on
different files (``benchmarks/run_experiments.py --jobs`` does) and set ``train.threads`` to the
cores each may use.

Every run's config and method names are checked before the first run starts, and so are what runs
meet only at their end (loggers, answer checkers: :func:`mixsel.preflight.check_methods`); a run may
not be named after compare's own outputs (``summary.json``, ``summary.md``, ``plots``), and a key
written twice in the file is an error naming its line.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mixsel.config import (
    RESULT_SAFE_FIELDS,
    config_diff,
    config_fingerprint,
    describe_diff,
    load_config,
    read_yaml,
    resolve_override,
    run_fields,
)
from mixsel.errors import ConfigError, UnknownNameError

__all__ = ["format_exact_match", "format_table", "format_time", "run_compare", "summarize"]

_COLUMNS = [
    ("val/loss_mean", "val loss", "{:.3f}"),
    ("val/loss_worst", "worst domain", "{:.3f}"),
    ("test/loss_mean", "test loss", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("conflicts", "conflicts/step", "{:.1f}"),
    ("step_time", "s/step", "{:.2f}"),
    ("select_time", "select s/step", "{:.2f}"),
    ("wall_time_s", "time (s)", "{:.0f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
]

# summary keys of result.json's "time" parts (wall seconds of the run's last process) -> their titles
_TIME_PARTS = {
    "wall_s/data": "data",
    "wall_s/model": "model",
    "wall_s/train": "train",
    "wall_s/eval": "eval",
    "wall_s/total": "total",
}


def _metric(result: dict[str, Any], key: str) -> float | None:
    if key == "exact_match":
        vals = [v for k, v in result.items() if k.startswith("test/exact_match/")]
        return sum(vals) / len(vals) if vals else None
    if key.startswith("wall_s/"):  # result.json's "time": {"data_s": ...} (absent in older runs)
        value = (result.get("time") or {}).get(key.removeprefix("wall_s/") + "_s")
        return float(value) if isinstance(value, (int, float)) else None
    value = result.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean, sample standard deviation (n - 1) and ``n`` (the seeds that have it) of each table column
    and test metric over seeds, per run name."""
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        test_keys = sorted({k for r in runs for k in r if k.startswith(("test/exact_match/", "test/generation/"))})
        for key in [k for k, _, _ in _COLUMNS] + list(_TIME_PARTS) + test_keys:
            vals = [v for v in (_metric(r, key) for r in runs) if v is not None and math.isfinite(v)]
            if vals:
                name_ = key.removeprefix("test/") if key in test_keys else key  # "generation/stated/<d>"...
                row[name_] = {
                    "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals),
                }
        summary[name] = row
    return summary


def format_exact_match(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of exact match per scored domain (test split) and their mean; "" if none scored."""
    domains = sorted({k.split("/", 1)[1] for row in summary.values() for k in row if k.startswith("exact_match/")})
    if not domains:
        return ""
    lines = ["| run | " + " | ".join(domains) + " | mean |", "|" + "---|" * (len(domains) + 2)]
    for name, row in summary.items():
        cells = [format_cell(row, f"exact_match/{d}", "{:.3f}") for d in domains]
        lines.append(f"| {name} | " + " | ".join([*cells, format_cell(row, "exact_match", "{:.3f}")]) + " |")
    return "\n".join(lines)


def format_time(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of each run's wall seconds by part (``result.json``'s ``time``: data, model,
    train, eval, total); ``-`` for a run without them (finished by an older version); "" if none has."""
    if not any(key in row for row in summary.values() for key in _TIME_PARTS):
        return ""
    lines = ["| run | " + " | ".join(_TIME_PARTS.values()) + " |", "|" + "---|" * (len(_TIME_PARTS) + 1)]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(row, key, "{:.1f}") for key in _TIME_PARTS) + " |")
    return "\n".join(lines)


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One summary cell: ``mean ± std`` when the row has several seeds, ``mean`` for one, ``-`` if absent;
    ``(n of N seeds)`` follows when only n of the row's N seeds have the value (an older run without it)."""
    cell = row.get(key)
    if not isinstance(cell, dict):
        return "-"
    seeds, n = row.get("seeds", 1), cell.get("n", row.get("seeds", 1))
    text = f"{fmt.format(cell['mean'])} ± {fmt.format(cell['std'])}" if n > 1 else fmt.format(cell["mean"])
    return text if n >= seeds else f"{text} ({n} of {seeds} seeds)"


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the summary (mean ± std over seeds; a ``seeds`` column when some run has several)."""
    many = any(row["seeds"] > 1 for row in summary.values())
    titles = (["seeds"] if many else []) + [title for _, title, _ in _COLUMNS]
    lines = ["| run | " + " | ".join(titles) + " |", "|" + "---|" * (len(titles) + 1)]
    for name, row in summary.items():
        cells = ([str(row["seeds"])] if many else []) + [format_cell(row, key, fmt) for key, _, fmt in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_run_means(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Add per-step means from ``metrics.jsonl`` to ``result``: conflicting gradient pairs (when a Gram
    was computed), seconds per step and seconds of selection (pool features + solver) per step; and,
    for a run whose ``result.json`` predates ``test/generation/stated/<domain>``, that share counted in
    its ``generations.jsonl`` (:func:`mixsel.answers.states_answer`)."""
    result = _with_stated(result, run_dir / "generations.jsonl")
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        means = (("select/conflicts", "conflicts"), ("time/step", "step_time"), ("time/select", "select_time"))
        for key, name in means:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                result = {**result, name: statistics.fmean(vals)}
    return result


def _with_stated(result: dict[str, Any], path: Path) -> dict[str, Any]:
    if not path.exists() or any(k.startswith("test/generation/stated/") for k in result):
        return result
    from mixsel.answers import states_answer

    counts: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            counts.setdefault(record["domain"], []).append(states_answer(record["generated"]))
    return {**result, **{f"test/generation/stated/{d}": sum(v) / len(v) for d, v in counts.items()}}


def _substitute(override: str, out: Path, seed: int, runs: dict[str, Any], current: str) -> str:
    """Replace ``{run:NAME}`` by the folder of run NAME with the same seed (listed before ``current``)."""
    earlier = list(runs)[: list(runs).index(current)]
    while "{run:" in override:
        start = override.index("{run:")
        end = override.find("}", start)
        if end < 0:
            raise ConfigError(f"runs.{current}: override {override!r} has '{{run:' without a closing '}}'")
        name = override[start + 5 : end]
        if name not in earlier:
            raise ConfigError(
                f"runs.{current}: override {override!r} refers to run {name!r}, which must be listed before it"
            )
        override = override[:start] + str(out / name / f"seed{seed}") + override[end + 1 :]
    return override


_SPEC_KEYS = ("base", "overrides", "seeds", "output_dir", "runs")
# what run_compare writes next to the run folders (a run may not be named after one, in any case)
_OWN_OUTPUTS = ("summary.json", "summary.md", "plots")


def _string_list(value: Any, where: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise ConfigError(f"{path}: {where} must be a list of overrides, got the string {value!r}; write [{value}]")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{path}: {where} must be a list of a.b=c strings, got {value!r}")
    return list(value)


def load_compare_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a compare file: one clear line for each way it can be wrong.

    Returns:
        ``{"base": Path | None, "overrides": [...], "seeds": [...], "output_dir": Path | None,
        "runs": {name: [...]}}`` with ``base`` and ``output_dir`` resolved against the file's folder.
    """
    path = Path(path)
    spec = read_yaml(path, what="compare file")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"compare file {path} must hold a mapping ({', '.join(_SPEC_KEYS)}), not a {type(spec).__name__}"
        )
    unknown = set(spec) - set(_SPEC_KEYS)
    if unknown:
        raise UnknownNameError(f"unknown compare keys {sorted(unknown)} in {path}; valid: {', '.join(_SPEC_KEYS)}")
    folder = path.resolve().parent
    runs = spec.get("runs")
    if isinstance(runs, list):
        raise ConfigError(
            f"{path}: 'runs' must map run names to lists of overrides, got a list; write "
            "runs: {random: [selection.method=random], ...}"
        )
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path}: 'runs' must map run names to lists of overrides (runs: {{name: [a.b=c]}})")
    checked: dict[str, list[str]] = {}
    for name, overrides in runs.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{path}: run name {name!r} must be a plain folder name (no '/', not '.' or '..')")
        if name.lower() in _OWN_OUTPUTS:
            raise ConfigError(
                f"{path}: run name {name!r} clashes with what mixsel compare writes in output_dir "
                f"({', '.join(_OWN_OUTPUTS)}); rename the run"
            )
        checked[name] = _string_list(overrides, f"runs.{name}", path)
    seeds = spec.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        raise ConfigError(f"{path}: seeds must be a list of integers, got {seeds!r}; write seeds: [{seeds}]")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers (e.g. [0, 1]), got {seeds!r}")
    base = spec.get("base")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(f"{path}: base must be the path of an experiment YAML, got {base!r}")
    base_path = (folder / Path(base).expanduser()) if base else None
    if base_path is not None and not base_path.is_file():
        raise FileNotFoundError(
            f"{path}: base {base!r} is not a file (paths in a compare file resolve against its folder, {folder})"
        )
    output_dir = spec.get("output_dir")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir.strip()):
        raise ConfigError(f"{path}: output_dir must be a folder path, got {output_dir!r}")
    return {
        "base": base_path,
        "overrides": [resolve_override(o, folder) for o in _string_list(spec.get("overrides"), "overrides", path)],
        "seeds": seeds,
        "output_dir": (folder / Path(output_dir).expanduser()) if output_dir else None,
        "runs": checked,
        "folder": folder,
    }


def _refs(overrides: list[str]) -> set[str]:
    """The run names an override list refers to through ``{run:NAME}``."""
    names = set()
    for item in overrides:
        rest = item
        while "{run:" in rest and "}" in rest[rest.index("{run:") :]:
            start = rest.index("{run:") + 5
            end = rest.index("}", start)
            names.add(rest[start:end])
            rest = rest[end + 1 :]
    return names


def _decide(run_dir: Path, cfg: Any, forced: bool) -> tuple[str, str]:
    """``("skip" | "rerun" | "resume" | "fresh", why)`` for one (run, seed) of a comparison."""
    from mixsel.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, read_manifest

    done = run_dir / "result.json"
    if done.exists():
        if forced:
            return "rerun", "a run it refers to was trained again"
        try:
            old = run_fields(json.loads(done.read_text())["config"], RESULT_SAFE_FIELDS)
        except (ValueError, KeyError, TypeError):
            return "rerun", "its result.json is unreadable or from another version"
        diff = config_diff(old, run_fields(cfg, RESULT_SAFE_FIELDS))
        return ("rerun", describe_diff(diff)) if diff else ("skip", "unchanged")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "fresh", ""
    wanted = config_fingerprint(cfg, RESULT_SAFE_FIELDS)
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        manifest = read_manifest(run_dir / name)
        if manifest is not None and not forced and manifest.get("result_fingerprint") == wanted:
            return "resume", f"from step {manifest.get('step')}"
    return "rerun", "an interrupted run with another config (or no checkpoint)"


def run_compare(path: str | Path, extra_overrides: list[str] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run every (run, seed) of the compare file ``path``; return the summary.

    ``progress`` shows each run's progress bar and start lines, and a line per skipped or rerun run.
    """
    from mixsel.preflight import check_methods
    from mixsel.runfolder import check_output_dir
    from mixsel.train import train

    path = Path(path)
    spec = load_compare_spec(path)
    extra = list(extra_overrides or [])
    common = [*spec["overrides"], *extra]
    seeds = spec["seeds"]
    out = spec["output_dir"] or Path.cwd() / "runs" / "compare"
    for item in common:  # the last train.output_dir override wins (file ones are absolute by now)
        if item.startswith("train.output_dir="):
            out = Path(item.split("=", 1)[1].strip().strip('"')).absolute()
    check_output_dir(out, "output_dir")
    say = print if progress else (lambda *args, **kwargs: None)

    def config(name: str, seed: int, overrides: list[str]) -> Any:
        run_dir = out / name / f"seed{seed}"
        own = [resolve_override(_substitute(o, out, seed, spec["runs"], name), spec["folder"]) for o in overrides]
        return load_config(spec["base"], [*common, *own, f"seed={seed}", f"train.output_dir={run_dir}", f"name={name}"])

    # every run's config and methods are checked before the first one trains
    for name, overrides in spec["runs"].items():
        for seed in seeds:
            check_methods(config(name, seed, overrides))

    results: dict[str, list[dict[str, Any]]] = {}
    retrained: dict[int, set[str]] = {seed: set() for seed in seeds}
    for name, overrides in spec["runs"].items():
        results[name] = []
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            cfg = config(name, seed, overrides)
            action, why = _decide(run_dir, cfg, forced=bool(_refs(overrides) & retrained[seed]))
            if action == "skip":
                say(f"{name}/seed{seed}: unchanged, kept", flush=True)
                results[name].append(_with_run_means(json.loads((run_dir / "result.json").read_text()), run_dir))
                continue
            if action != "fresh":
                say(f"{name}/seed{seed}: {'resuming' if action == 'resume' else 'training again'} ({why})", flush=True)
            cfg.train.resume = action == "resume"
            cfg.train.overwrite = action == "rerun"
            retrained[seed].add(name)
            results[name].append(_with_run_means(train(cfg, progress=progress), run_dir))
    summary = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    em = format_exact_match(summary)
    if em:
        table += "\n\nExact match per scored domain (test split):\n\n" + em
    times = format_time(summary)
    if times:
        table += "\n\nWall seconds by part (the run's last process; a resumed run counts since its resume):\n\n" + times
    (out / "summary.md").write_text(table + "\n")
    try:
        from mixsel.plots import plot_compare

        plot_compare(out, list(results), seeds)
    except ImportError:  # matplotlib is optional (pip install mixsel[plot])
        pass
    return {"summary": summary, "table": table, "output_dir": str(out)}
