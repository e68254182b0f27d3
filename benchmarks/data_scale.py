"""How ``mixsel train`` scales with the size of its corpus: preparation, cache reuse, memory and s/step.

For each corpus size (``--rows``, default 10k, 100k, 300k and 1M rows) a JSONL file is written by
repeating the embedded corpus, and three children are measured, one after the other, each in its
own process (so each has its own peak RSS):

1. the reference: the embedded tokenizer's own ``tokenizers.Tokenizer.encode_batch`` over the same
   strings mixsel encodes (a plain row's ``text``; a prompt/response row's ``prompt + "\\n"`` and
   ``response``, apart, as mixsel does without a chat template), in chunks of 2048, no special
   tokens, no truncation; only the encoding is timed (not reading the file);
2. the first run: ``mixsel train --config configs/default.yaml data.source=<file>
   data.cache_dir=<a fresh, empty folder for this size> train.max_steps=2 train.threads=1
   eval.exact_match=0 train.plots=false train.log_every=1`` (cold: it prepares the corpus);
3. the second run: the same with ``selection.method=stratified`` (``--second``), the SAME
   ``data.cache_dir``, and a new run folder (warm: it should reuse the prepared corpus).

Recorded per size: the file's MB; the tokenizer's seconds and rows/s; each run's wall seconds
(process start to exit), peak RSS and, when ``result.json`` has one, its ``time`` dict (``data_s``,
``model_s``, ``train_s``, ``eval_s``, ``total_s``; null otherwise); the cache folder's MB after the
first run; s/step of the second run (the mean ``time/step`` of its ``metrics.jsonl`` after the first
``--warmup`` steps, else ``time.train_s / steps``); the 1-minute load average before and after each
child. Derived against the project's targets::

    prep_over_tokenizer  first run's time.data_s (its wall time where there is no time dict) / tokenizer s
    second_run_extra_s   second run's wall - the smallest size's second run's wall
    rss_ratio            peak RSS (the larger of the two runs) / the smallest size's
    step_s_ratio         s/step / the smallest size's

Targets (PASS/FAIL printed after the last size): preparation <= 1.5x the tokenizer's encoding (at
every size >= ``--prep-min-rows``, since below it start-up costs dominate; the largest size if none
is that large); the second run at 300k <= 15 s more than at 10k; peak RSS at 300k and 1M <= 1.3 x
(RSS at 10k) + 200 MB; s/step at every size within 10% of the 10k one. Where 10k / 300k / 1M were
not measured, the smallest / largest size stands in (and the line says so).

How it is measured:

* Peak RSS: every child runs under a small wrapper (this script, ``--measure``) that starts it and
  reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` when it has exited: the peak RSS of the largest
  single process of its tree (not a sum; file-backed pages of a memory-mapped dataset that were read
  count). The wrapper also samples the summed PSS of the whole tree (``/proc/<pid>/smaps_rollup``)
  every 0.2 s, so tokenising worker processes (``data.prepare_workers``) show: ``tree_pss_mb``.
* Environment: every child gets this process's environment, ``TOKENIZERS_PARALLELISM`` passed on
  unchanged (its value is recorded; it decides whether ``encode_batch`` uses every core), except
  ``MIXSEL_CACHE`` (removed, so only ``data.cache_dir`` decides what is reused) and
  ``HF_DATASETS_CACHE`` (``<work>/hf_datasets_<rows>``, emptied before the first run, so no
  ``datasets`` cache from an earlier attempt makes a first run warm).
* The corpus: the embedded corpus's 27,671 rows (``corpus.jsonl.gz``, every split), each written as
  its raw JSON row (``domain`` and ``text``, or ``prompt``, ``response``, ``answer``) without its
  ``split`` column (``--keep-split`` keeps it), so mixsel splits per domain by the seed and the
  validation/test sets stay 32 rows per domain at every size while the training set grows. The file
  is domain-ordered; ``--order mixed`` (the default) interleaves the domains in proportion, so every
  size has all seven domains in the corpus's shares (``--order file``: the file order, which makes a
  10k file python_code only). The rows repeat from the start, unchanged: copies are identical
  (tagging them, e.g. " (copy N)", would change the token counts and so the work per row). The
  tokenizer's BPE word cache helps the reference and mixsel alike, so the ratio stays fair.
* Data files are written under ``--work`` (default /tmp/mixsel_data_scale, never the repository) and
  reused when their row count and ordering match; run folders and caches there are deleted and
  rewritten for each size.

Run::

    python benchmarks/data_scale.py                          # 10k, 100k, 300k, 1M (long)
    python benchmarks/data_scale.py --resume                 # continue: sizes already measured are kept
    python benchmarks/data_scale.py --rows 2000,5000 --work /tmp/ds_trial --out /tmp/ds_trial/data_scale.json \
        data.val_per_domain=4 data.test_per_domain=4     # a quick end-to-end check (~1-2 min)
    python benchmarks/data_scale.py --report                 # the markdown table of the JSON

Below ~5k rows the smallest domains (legal, chemistry) have too few rows for 32 validation + 32 test
rows each: lower ``data.val_per_domain`` / ``data.test_per_domain`` (trailing overrides go to both
runs). With 2 steps, s/step is one step's time on a possibly busy machine: for the s/step target,
``--steps 8 --warmup 2`` gives a mean over 6 steps. Writes ``benchmarks/results/data_scale.json``
(after each size) and ``data_scale.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import mean
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
DEFAULT_ROWS = "10000,100000,300000,1000000"
DEFAULT_WORK = "/tmp/mixsel_data_scale"
CHUNK = 2048  # strings per encode_batch call (mixsel.data.tokenize._CHUNK)
SEPARATOR = "\n"  # data.separator: prompt + separator, then the response (no chat template)
TIME_KEYS = ("data_s", "model_s", "train_s", "eval_s", "total_s")

# the targets
PREP_FACTOR = 1.5  # first-run preparation <= 1.5x the tokenizer's own encoding
SECOND_EXTRA_S = 15.0  # second run at 300k <= 15 s more than at 10k
RSS_FACTOR, RSS_SLACK_MB = 1.3, 200.0  # peak RSS at 300k and 1M <= 1.3x that at 10k + 200 MB
STEP_TOL = 0.10  # s/step within 10% of the 10k one
BASE_ROWS, MID_ROWS, TOP_ROWS = 10_000, 300_000, 1_000_000


# ---- the measuring wrapper (runs as its own process) --------------------------------------------


def _tree(root: int) -> list[int]:
    """``root`` and every live descendant, from ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss_mb(pid: int) -> float:
    """The proportional set size of ``pid`` in MB (its RSS where smaps_rollup is unreadable; 0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def measure(out: str, log: str, cmd: list[str], interval: float = 0.2) -> int:
    """Run ``cmd`` (stdout and stderr to ``log``); write its wall time, peak RSS and tree PSS to ``out``."""
    peak = {"pss": 0.0}
    with open(log, "w") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)

        def sample() -> None:
            while proc.poll() is None and os.path.isdir("/proc"):
                peak["pss"] = max(peak["pss"], sum(_pss_mb(pid) for pid in _tree(proc.pid)))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.join(timeout=2 * interval + 1)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # this wrapper's only child (and what it waited for)
    result = {
        "rc": rc,
        "wall_s": round(wall, 3),
        "rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "tree_pss_mb": round(peak["pss"], 1) if peak["pss"] else None,
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
    }
    Path(out).write_text(json.dumps(result))
    return 0


# ---- the tokenizer reference (runs as its own process) ------------------------------------------


def row_strings(row: dict[str, Any]) -> list[str]:
    """The strings mixsel encodes for a row: its text, or its prompt (+ separator) and its response."""
    if "response" in row and "prompt" in row:
        prompt = str(row["prompt"])
        return [prompt + SEPARATOR if prompt else "", str(row["response"])]
    return [str(row["text"])]


def tokenizer_child(data: str, tokenizer_file: str, out: str, chunk: int) -> int:
    """Encode every row of ``data`` with the tokenizer's ``encode_batch``; only the encoding is timed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    tok.no_truncation()
    tok.no_padding()
    strings: list[str] = []
    rows = 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                strings.extend(row_strings(json.loads(line)))
                rows += 1
    tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(strings), chunk):
        encs = tok.encode_batch(strings[start : start + chunk], add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encs)
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"seconds": seconds, "rows": rows, "strings": len(strings), "tokens": tokens}))
    return 0


# ---- the corpus files ---------------------------------------------------------------------------


def corpus_path() -> Path:
    from mixsel.data.embedded import EMBEDDED_DIR

    return EMBEDDED_DIR / "corpus.jsonl.gz"


def tokenizer_path() -> Path:
    from mixsel.data.embedded import embedded_tokenizer_path

    return embedded_tokenizer_path()


def base_lines(order: str, keep_split: bool) -> tuple[list[bytes], str]:
    """The embedded corpus's rows as JSONL lines in the order they repeat, and the corpus's sha256."""
    raw = corpus_path().read_bytes()
    rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]
    if order == "mixed":  # proportional interleave: row j of a domain with n rows sits at (j + 0.5) / n
        seen: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for r in rows:
            sizes[r["domain"]] = sizes.get(r["domain"], 0) + 1
        keys = []
        for i, r in enumerate(rows):
            j = seen.get(r["domain"], 0)
            seen[r["domain"]] = j + 1
            keys.append(((j + 0.5) / sizes[r["domain"]], i))
        rows = [rows[i] for _, i in sorted(keys)]
    lines = []
    for r in rows:
        if not keep_split:
            r = {k: v for k, v in r.items() if k != "split"}
        lines.append((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return lines, hashlib.sha256(raw).hexdigest()


def write_corpus(path: Path, n: int, lines: list[bytes], meta: dict[str, Any]) -> None:
    """``n`` rows (``lines`` repeated from the start) to ``path``; reused when its ``.meta.json`` matches."""
    meta_path = path.with_suffix(".meta.json")
    want = {**meta, "rows": n}
    if path.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == {**want, "bytes": path.stat().st_size}:
                print(f"  data: reusing {path} ({path.stat().st_size / 2**20:.1f} MB)", flush=True)
                return
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb", buffering=1 << 20) as f:
        full, rest = divmod(n, len(lines))
        for _ in range(full):
            f.writelines(lines)
        f.writelines(lines[:rest])
    tmp.replace(path)
    meta_path.write_text(json.dumps({**want, "bytes": path.stat().st_size}))
    print(
        f"  data: wrote {n:,} rows to {path} ({path.stat().st_size / 2**20:.1f} MB, {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


# ---- the measured children ----------------------------------------------------------------------


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, what: str) -> dict[str, Any]:
    """``cmd`` under the wrapper: wall time, peak RSS, tree PSS, load before and after; raises if it fails."""
    stats = log.with_suffix(".stats.json")
    stats.unlink(missing_ok=True)
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--measure", str(stats), "--log", str(log), "--", *cmd]
    before = load_1min()
    done = subprocess.run(wrapper, env=env, cwd=ROOT)
    after = load_1min()
    if done.returncode != 0 or not stats.exists():
        raise RuntimeError(f"the measuring wrapper failed ({done.returncode}) for {what}: {' '.join(cmd)}")
    result = json.loads(stats.read_text())
    if result["rc"] != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"{what} failed (exit {result['rc']}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return {**result, "load_before": before, "load_after": after, "log": str(log)}


def dir_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return round(total / 2**20, 1)


def read_time(run_dir: Path) -> dict[str, Any] | None:
    """The ``time`` dict of the run's ``result.json`` (null when the code writes none)."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    t = result.get("time")
    return (
        {k: (round(v, 3) if isinstance(v, (int, float)) else v) for k, v in t.items()} if isinstance(t, dict) else None
    )


def step_seconds(run_dir: Path, time_dict: dict[str, Any] | None, steps: int, warmup: int) -> dict[str, Any]:
    """s/step: the mean ``time/step`` of ``metrics.jsonl`` after ``warmup`` steps, else ``time.train_s / steps``."""
    rows, model = [], []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if isinstance(row.get("time/step"), (int, float)):
                    rows.append(float(row["time/step"]))
                    model.append(float(row.get("time/train", 0.0)))
    if rows:
        kept, kept_model = rows[warmup:] or rows, model[warmup:] or model
        return {
            "step_s": round(mean(kept), 4),
            "source": "metrics.jsonl time/step",
            "steps": [round(x, 4) for x in rows],
            # the selected rows' forward/backward/update (time/train: depends on which rows, so on their
            # lengths), and the rest of the step: drawing, collating, features, selection, bookkeeping
            "model_s": round(mean(kept_model), 4),
            "overhead_s": round(mean(a - b for a, b in zip(kept, kept_model)), 4),
        }
    if time_dict and isinstance(time_dict.get("train_s"), (int, float)) and steps:
        return {"step_s": round(time_dict["train_s"] / steps, 4), "source": "time.train_s / steps", "steps": None}
    return {"step_s": None, "source": None, "steps": None}


def train_cmd(config: str, data: Path, cache: Path, out: Path, steps: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mixsel",
        "train",
        "--config",
        config,
        f"data.source={data}",
        f"data.cache_dir={cache}",
        f"train.max_steps={steps}",
        "train.threads=1",
        "eval.exact_match=0",
        f"train.output_dir={out}",
        "train.plots=false",
        "train.log_every=1",
        *overrides,
    ]


def measure_size(n: int, settings: dict[str, Any], work: Path, lines: list[bytes], corpus_sha: str) -> dict[str, Any]:
    """The three measurements of one corpus size (data file written first, untimed)."""
    data = work / f"data_{n}.jsonl"
    write_corpus(
        data, n, lines, {"order": settings["order"], "keep_split": settings["keep_split"], "corpus": corpus_sha}
    )
    cache = work / f"cache_{n}"
    hf_cache = work / f"hf_datasets_{n}"
    first_dir, second_dir = work / f"run_first_{n}", work / f"run_second_{n}"
    for d in (cache, hf_cache, first_dir, second_dir):  # all inside --work: a fresh start for this size
        shutil.rmtree(d, ignore_errors=True)
    cache.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MIXSEL_CACHE"}
    env["HF_DATASETS_CACHE"] = str(hf_cache)
    record: dict[str, Any] = {
        "rows": n,
        "file_mb": round(data.stat().st_size / 2**20, 2),
        "settings": settings,
        "env": {
            "TOKENIZERS_PARALLELISM": env.get("TOKENIZERS_PARALLELISM"),
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
            "HF_DATASETS_CACHE": "<work>/hf_datasets_<rows>",
            "MIXSEL_CACHE": "removed" if "MIXSEL_CACHE" in os.environ else None,
        },
        "cpu_count": os.cpu_count(),
    }

    # 1. the tokenizer's own batch encoding
    tok_out = logs / f"{n}_tokenizer.out.json"
    tok_out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tokenizer-child", str(data)]
    cmd += ["--tokenizer-file", str(tokenizer_path()), "--child-out", str(tok_out), "--chunk", str(settings["chunk"])]
    proc = run_measured(cmd, env, logs / f"{n}_tokenizer.log", f"tokenizer encoding ({n:,} rows)")
    enc = json.loads(tok_out.read_text())
    record["tokenizer"] = {
        **enc,
        "seconds": round(enc["seconds"], 3),
        "rows_per_s": round(enc["rows"] / enc["seconds"], 1) if enc["seconds"] > 0 else None,
        "process": proc,
    }
    record["tokenizer_s"] = record["tokenizer"]["seconds"]
    print(
        f"  tokenizer: {record['tokenizer_s']:.2f} s encoding ({record['tokenizer']['rows_per_s']:,.0f} rows/s, "
        f"{enc['tokens']:,} tokens), process {proc['wall_s']:.1f} s, {proc['rss_mb']:.0f} MB "
        f"(load {proc['load_before']:.1f} -> {proc['load_after']:.1f})",
        flush=True,
    )

    # 2-3. the first (cold) and second (warm) mixsel train runs, the same cache folder
    steps = settings["steps"]
    for key, run_dir, extra in (
        ("first_run", first_dir, settings["overrides"]),
        ("second_run", second_dir, [*settings["overrides"], *settings["second"]]),
    ):
        cmd = train_cmd(settings["config_path"], data, cache, run_dir, steps, extra)
        proc = run_measured(cmd, env, logs / f"{n}_{key}.log", f"mixsel train, {key.replace('_', ' ')} ({n:,} rows)")
        timing = read_time(run_dir)
        entries = sorted(p.name for p in cache.iterdir() if p.is_dir())  # one folder per prepared corpus
        rec = {**proc, "time": timing, "cache_mb": dir_mb(cache), "cache_entries": entries}
        if key == "second_run":  # reused: it prepared nothing new into the cache folder
            rec["cache_reused"] = bool(entries) and entries == record["first_run"]["cache_entries"]
            per_step = step_seconds(run_dir, timing, steps, settings["warmup"])
            rec.update(step_s=per_step["step_s"], step_s_source=per_step["source"], step_times_s=per_step["steps"])
            rec.update(step_model_s=per_step.get("model_s"), step_overhead_s=per_step.get("overhead_s"))
        record[key] = rec
        data_s = f", data {timing['data_s']:.1f} s" if timing and isinstance(timing.get("data_s"), (int, float)) else ""
        reused = {None: "", True: " (reused)", False: " (NOT reused)"}[rec.get("cache_reused")]
        pss = f", tree PSS {proc['tree_pss_mb']:.0f} MB" if proc.get("tree_pss_mb") else ""
        print(
            f"  {key.replace('_', ' ')}: {proc['wall_s']:.1f} s wall{data_s}, peak RSS {proc['rss_mb']:.0f} MB{pss}, "
            f"cache {rec['cache_mb']:.1f} MB{reused}, time dict {'yes' if timing else 'no'} "
            f"(load {proc['load_before']:.1f} -> {proc['load_after']:.1f})",
            flush=True,
        )
    record["step_s"] = record["second_run"]["step_s"]
    record["step_s_source"] = record["second_run"]["step_s_source"]
    if record["step_s"] is not None:
        print(f"  s/step (second run): {record['step_s']:.3f} ({record['step_s_source']})", flush=True)
    return record


# ---- derived ratios, targets, report, plot ------------------------------------------------------


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def prep_seconds(rec: dict[str, Any]) -> tuple[float, str]:
    """The first run's preparation seconds: ``time.data_s``, or its wall time where there is no time dict."""
    t = rec["first_run"].get("time") or {}
    if _num(t.get("data_s")) is not None:
        return float(t["data_s"]), "time.data_s"
    return float(rec["first_run"]["wall_s"]), "wall_s"


def peak_rss(rec: dict[str, Any]) -> float:
    return max(rec["first_run"]["rss_mb"], rec["second_run"]["rss_mb"])


def derive(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per size: the ratios the targets read, against the smallest size."""
    if not records:
        return {}
    base = min(records, key=lambda r: r["rows"])
    out = {}
    for r in records:
        prep, source = prep_seconds(r)
        step, base_step = _num(r.get("step_s")), _num(base.get("step_s"))
        out[str(r["rows"])] = {
            "prep_s": round(prep, 3),
            "prep_source": source,
            "prep_over_tokenizer": round(prep / r["tokenizer_s"], 3) if r["tokenizer_s"] > 0 else None,
            "second_run_extra_s": round(r["second_run"]["wall_s"] - base["second_run"]["wall_s"], 2),
            "rss_mb": peak_rss(r),
            "rss_ratio": round(peak_rss(r) / peak_rss(base), 3),
            "step_s_ratio": round(step / base_step, 3) if step is not None and base_step else None,
            "against_rows": base["rows"],
        }
    return out


def _pick(records: dict[int, dict[str, Any]], want: int, fallback: int) -> tuple[int, str]:
    """``want`` rows if measured, else ``fallback`` (a stand-in, said so)."""
    if want in records:
        return want, ""
    return fallback, f" (stand-in for {want:,}: {fallback:,})"


def targets(records: list[dict[str, Any]], prep_min_rows: int) -> list[dict[str, Any]]:
    """The four targets, each ``{"name", "pass", "detail"}``."""
    if not records:
        return []
    by_rows = {r["rows"]: r for r in records}
    smallest, largest = min(by_rows), max(by_rows)
    out = []

    sizes = [n for n in sorted(by_rows) if n >= prep_min_rows] or [largest]
    parts, ok = [], True
    for n in sizes:
        prep, source = prep_seconds(by_rows[n])
        ratio = prep / by_rows[n]["tokenizer_s"] if by_rows[n]["tokenizer_s"] > 0 else float("inf")
        ok &= ratio <= PREP_FACTOR
        parts.append(f"{n:,}: {prep:.2f} s ({source}) / {by_rows[n]['tokenizer_s']:.2f} s = {ratio:.2f}x")
    out.append(
        {"name": f"first-run preparation <= {PREP_FACTOR}x the tokenizer", "pass": ok, "detail": "; ".join(parts)}
    )

    base, base_note = _pick(by_rows, BASE_ROWS, smallest)
    mid, mid_note = _pick(by_rows, MID_ROWS, largest)
    extra = by_rows[mid]["second_run"]["wall_s"] - by_rows[base]["second_run"]["wall_s"]
    out.append(
        {
            "name": f"second run at {MID_ROWS:,} <= {SECOND_EXTRA_S:g} s more than at {BASE_ROWS:,}",
            "pass": extra <= SECOND_EXTRA_S,
            "detail": f"{by_rows[mid]['second_run']['wall_s']:.1f} s - {by_rows[base]['second_run']['wall_s']:.1f} s "
            f"= {extra:+.1f} s{mid_note}{base_note}",
        }
    )

    limit = RSS_FACTOR * peak_rss(by_rows[base]) + RSS_SLACK_MB
    big = [n for n in (MID_ROWS, TOP_ROWS) if n in by_rows] or [largest]
    note = "" if any(n in by_rows for n in (MID_ROWS, TOP_ROWS)) else f" (stand-in for 300k/1M: {largest:,})"
    parts = [f"{n:,}: {peak_rss(by_rows[n]):.0f} MB" for n in big]
    out.append(
        {
            "name": f"peak RSS at {MID_ROWS:,} and {TOP_ROWS:,} <= {RSS_FACTOR}x that at {BASE_ROWS:,} "
            f"+ {RSS_SLACK_MB:g} MB",
            "pass": all(peak_rss(by_rows[n]) <= limit for n in big),
            "detail": f"{', '.join(parts)}; limit {limit:.0f} MB ({base:,}: {peak_rss(by_rows[base]):.0f} MB)"
            f"{note}{base_note}",
        }
    )

    base_step = _num(by_rows[base].get("step_s"))
    others = [n for n in sorted(by_rows) if n != base]
    if base_step and others and all(_num(by_rows[n].get("step_s")) is not None for n in others):
        ratios = {n: by_rows[n]["step_s"] / base_step for n in others}
        out.append(
            {
                "name": f"s/step within {STEP_TOL:.0%} of the {BASE_ROWS:,} one",
                "pass": all(abs(x - 1) <= STEP_TOL for x in ratios.values()),
                "detail": ", ".join(f"{n:,}: {by_rows[n]['step_s']:.3f} s ({x:.2f}x)" for n, x in ratios.items())
                + f"; {base:,}: {base_step:.3f} s{base_note}",
            }
        )
    else:
        out.append(
            {
                "name": f"s/step within {STEP_TOL:.0%} of the {BASE_ROWS:,} one",
                "pass": None,
                "detail": "needs s/step at two sizes or more",
            }
        )
    return out


def fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if _num(x) is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| rows | file MB | tokenizer s | first-run data s | ratio | second-run wall s | peak RSS MB | s/step "
        "| of which fwd/bwd | rest of the step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    derived = result.get("derived", {})
    for r in sorted(result.get("sizes", []), key=lambda r: r["rows"]):
        d = derived.get(str(r["rows"]), {})
        second = r["second_run"]
        prep = fmt(d.get("prep_s")) + (" (wall)" if d.get("prep_source") == "wall_s" else "")
        lines.append(
            f"| {r['rows']:,} | {r['file_mb']:.1f} | {r['tokenizer_s']:.2f} | {prep} "
            f"| {fmt(d.get('prep_over_tokenizer'))} "
            f"| {r['second_run']['wall_s']:.1f} | {fmt(d.get('rss_mb'), '.0f')} | {fmt(r.get('step_s'), '.3f')} "
            f"| {fmt(second.get('step_model_s'), '.3f')} | {fmt(second.get('step_overhead_s'), '.3f')} |"
        )
    return "\n".join(lines)


def target_lines(checks: list[dict[str, Any]]) -> list[str]:
    word = {True: "PASS", False: "FAIL", None: "n/a "}
    return [f"{word[c['pass']]}  {c['name']}: {c['detail']}" for c in checks]


def plot(result: dict[str, Any], path: Path) -> None:
    """2x2: preparation and tokenizer seconds; second-run wall; peak RSS; s/step; against rows (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = sorted(result["sizes"], key=lambda r: r["rows"])
    derived = result["derived"]
    rows = [r["rows"] for r in records]
    base = records[0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    tok = [r["tokenizer_s"] for r in records]
    ax.plot(rows, [derived[str(n)]["prep_s"] for n in rows], "o-", label="first run: preparation (time.data_s)")
    ax.plot(rows, tok, "s-", label="tokenizer encode_batch")
    ax.plot(rows, [PREP_FACTOR * t for t in tok], "k--", linewidth=1, label=f"target: {PREP_FACTOR}x tokenizer")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("seconds")
    ax.set_title("preparing the corpus (cold)")
    ax = axes[0][1]
    ax.plot(rows, [r["second_run"]["wall_s"] for r in records], "o-", label="second run (warm cache)")
    ax.plot(rows, [r["first_run"]["wall_s"] for r in records], "o:", alpha=0.6, label="first run (cold)")
    ax.axhline(
        base["second_run"]["wall_s"] + SECOND_EXTRA_S,
        color="k",
        linestyle="--",
        linewidth=1,
        label=f"target: smallest + {SECOND_EXTRA_S:g} s",
    )
    ax.set_ylabel("wall seconds, process start to exit")
    ax.set_title("mixsel train wall time")
    ax = axes[1][0]
    ax.plot(rows, [r["first_run"]["rss_mb"] for r in records], "o-", label="first run")
    ax.plot(rows, [r["second_run"]["rss_mb"] for r in records], "s-", label="second run")
    pss = [r["first_run"].get("tree_pss_mb") for r in records]
    if all(p is not None for p in pss):
        ax.plot(rows, pss, "^:", alpha=0.6, label="first run: tree PSS (sampled)")
    ax.axhline(
        RSS_FACTOR * peak_rss(base) + RSS_SLACK_MB,
        color="k",
        linestyle="--",
        linewidth=1,
        label=f"target: {RSS_FACTOR}x smallest + {RSS_SLACK_MB:g} MB",
    )
    ax.set_ylabel("peak RSS, MB")
    ax.set_title("memory")
    ax = axes[1][1]
    steps = [r.get("step_s") for r in records]
    if all(s is not None for s in steps):
        ax.plot(rows, steps, "o-", label="second run s/step")
        ax.axhspan(
            steps[0] * (1 - STEP_TOL),
            steps[0] * (1 + STEP_TOL),
            color="0.85",
            label=f"target: smallest ±{STEP_TOL:.0%}",
        )
        ax.set_ylim(0, max(steps) * 1.3)
    ax.set_ylabel("seconds per step")
    ax.set_title("training step")
    for ax in (a for pair in axes for a in pair):
        ax.set_xscale("log")
        ax.set_xlabel("corpus rows")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    m = result.get("machine", {})
    fig.suptitle(
        f"mixsel train vs corpus size ({result['settings']['config']}, {result['settings']['steps']} steps, threads=1; "
        f"{m.get('cpus')} CPUs, TOKENIZERS_PARALLELISM={m.get('tokenizers_parallelism') or 'unset'})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the driver ---------------------------------------------------------------------------------


def git(*args: str) -> str | None:
    """A read-only git query in the repository (None when git or the repository is missing)."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def config_label(config: str) -> str:
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else config


def finish(result: dict[str, Any], out: Path, prep_min_rows: int) -> None:
    """Derived ratios and targets into ``result``; the JSON written (atomically)."""
    result["sizes"].sort(key=lambda r: r["rows"])
    result["derived"] = derive(result["sizes"])
    result["targets"] = targets(result["sizes"], prep_min_rows)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


def steps_check(work: Path, sizes: list[int], steps: int, warmup: int, out: Path) -> int:
    """s/step alone, on the corpora prepared by a full run (their caches under ``work`` are reused).

    The full run's s/step differs between sizes through the training mix: holding out 32 + 32 rows
    per domain takes half of a small domain at 10k rows, so the rows drawn (and their lengths, which
    set the forward/backward time) differ. Here every size holds out 4 + 4 rows per domain, so the
    mix is the corpus's at every size, and runs ``steps`` steps (the first ``warmup`` left out).
    Writes ``out`` (JSON): per size, s/step split into forward/backward and the rest, and the ratio
    to the smallest size; prints a PASS/FAIL line for the 10% target.
    """
    records = []
    for n in sizes:
        cache, data = work / f"cache_{n}", work / f"data_{n}.jsonl"
        if not cache.is_dir() or not data.exists():
            print(f"  {n:,}: no prepared cache in {cache}; run the full benchmark first", flush=True)
            return 2
        run_dir = work / f"run_steps_{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        extra = ["data.val_per_domain=4", "data.test_per_domain=4", "selection.method=stratified"]
        cmd = train_cmd(str(DEFAULT_CONFIG), data, cache, run_dir, steps, extra)
        env = {k: v for k, v in os.environ.items() if k != "MIXSEL_CACHE"}
        proc = run_measured(cmd, env, work / "logs" / f"{n}_steps.log", f"the s/step run of {n:,} rows")
        per_step = step_seconds(run_dir, read_time(run_dir), steps, warmup)
        records.append(
            {
                "rows": n,
                **per_step,
                "wall_s": proc["wall_s"],
                "rss_mb": proc["rss_mb"],
                "load_before": proc["load_before"],
                "load_after": proc["load_after"],
            }
        )
        print(
            f"  {n:,}: {per_step['step_s']:.3f} s/step ({per_step['model_s']:.3f} forward/backward + "
            f"{per_step['overhead_s']:.3f} the rest), load {proc['load_before']:.1f}",
            flush=True,
        )
    base = records[0]
    for r in records:
        r["step_s_ratio"] = round(r["step_s"] / base["step_s"], 3)
    ok = all(abs(r["step_s_ratio"] - 1) <= STEP_TOL for r in records)
    result = {
        "command": f"python benchmarks/data_scale.py --steps-check --steps {steps} --warmup {warmup}",
        "holdout": "4 + 4 rows per domain",
        "commit": git("rev-parse", "HEAD"),
        "cpus": os.cpu_count(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "sizes": records,
        "target": {"name": f"s/step within {STEP_TOL:.0%} of the {sizes[0]:,} one", "pass": ok},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        ("PASS" if ok else "FAIL")
        + f"  s/step within {STEP_TOL:.0%} of the {sizes[0]:,} one: "
        + ", ".join(f"{r['rows']:,}: {r['step_s']:.3f} s ({r['step_s_ratio']:.2f}x)" for r in records),
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated corpus sizes (default {DEFAULT_ROWS})")
    parser.add_argument("--work", default=DEFAULT_WORK, help="scratch folder for data files, caches and runs")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="the mixsel config (default configs/default.yaml)"
    )
    parser.add_argument("--steps", type=int, default=2, help="train.max_steps of each run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of s/step")
    parser.add_argument(
        "--second", default="selection.method=stratified", help="the second run's extra overrides (space-separated)"
    )
    parser.add_argument(
        "--order", choices=("mixed", "file"), default="mixed", help="the order the corpus rows repeat in"
    )
    parser.add_argument("--keep-split", action="store_true", help="keep the corpus's split column (fixed splits)")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="strings per encode_batch call")
    parser.add_argument(
        "--prep-min-rows", type=int, default=100_000, help="smallest size the preparation target checks"
    )
    parser.add_argument("--resume", action="store_true", help="keep sizes already in the JSON with the same settings")
    parser.add_argument("--report", action="store_true", help="print the markdown table of the JSON and stop")
    parser.add_argument(
        "--steps-check",
        action="store_true",
        help="s/step alone on the prepared caches of a full run, 4 + 4 held-out rows per domain at every size",
    )
    parser.add_argument(
        "--rederive",
        action="store_true",
        help="recompute step statistics from the run folders under --work, then report",
    )
    parser.add_argument("--out", default=str(RESULTS / "data_scale.json"), help="result JSON (the plot goes beside it)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, as for mixsel train")
    # the tokenizer child
    parser.add_argument("--tokenizer-child", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-file", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:  # the wrapper: --measure STATS --log LOG -- CMD...
        return measure(argv[1], argv[3], argv[5:])
    args = parser.parse_args(argv)
    if args.tokenizer_child:
        return tokenizer_child(args.tokenizer_child, args.tokenizer_file, args.child_out, args.chunk)

    out = Path(args.out)
    if args.steps_check:
        sizes = sorted({int(float(x)) for x in args.rows.split(",") if x.strip()})
        return steps_check(Path(args.work).resolve(), sizes, args.steps, args.warmup, RESULTS / "data_scale_steps.json")
    if args.rederive:  # step statistics again from the run folders under --work, then ratios and targets
        result = json.loads(out.read_text())
        for r in result["sizes"]:
            run_dir = Path(args.work) / f"run_second_{r['rows']}"
            per_step = step_seconds(
                run_dir, r["second_run"].get("time"), r["settings"]["steps"], r["settings"]["warmup"]
            )
            r["second_run"].update(step_model_s=per_step.get("model_s"), step_overhead_s=per_step.get("overhead_s"))
        finish(result, out, result["settings"]["prep_min_rows"])
        args.report = True
    if args.report:
        result = json.loads(out.read_text())
        print(markdown(result))
        print()
        print("\n".join(target_lines(result.get("targets", []))))
        return 0

    sizes = sorted({int(float(x)) for x in args.rows.split(",") if x.strip()})
    work = Path(args.work).resolve()
    if work == ROOT or ROOT in work.parents:
        parser.error(f"--work {work} is inside the repository; use a scratch folder (default {DEFAULT_WORK})")
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "config": config_label(args.config),
        "config_path": str(Path(args.config).resolve()),
        "steps": args.steps,
        "warmup": args.warmup,
        "overrides": args.overrides,
        "second": args.second.split(),
        "order": args.order,
        "keep_split": args.keep_split,
        "chunk": args.chunk,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    previous: list[dict[str, Any]] = []
    if args.resume and out.exists():
        previous = [r for r in json.loads(out.read_text()).get("sizes", []) if r.get("settings") == settings]
    done = {r["rows"] for r in previous}
    result: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in settings.items() if k != "config_path"},
            "command": train_cmd("<config>", Path("<file>"), Path("<cache>"), Path("<run>"), args.steps, [])[2:],
            "prep_min_rows": args.prep_min_rows,
            "targets": {
                "prep_over_tokenizer_max": PREP_FACTOR,
                "second_run_extra_s_max": SECOND_EXTRA_S,
                "rss_limit": f"{RSS_FACTOR} x rss(10k) + {RSS_SLACK_MB:g} MB",
                "step_s_tolerance": STEP_TOL,
            },
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "commits": {"head": git("rev-parse", "HEAD"), "src_dirty": bool(git("status", "--porcelain", "--", "src"))},
        "sizes": previous,
    }
    print(
        f"data_scale: sizes {[f'{n:,}' for n in sizes]} ({len(done & set(sizes))} kept from {out}); work {work}; "
        f"{os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={settings['tokenizers_parallelism'] or 'unset'}",
        flush=True,
    )
    lines, corpus_sha = base_lines(args.order, args.keep_split)
    for n in sizes:
        if n in done:
            print(f"[{n:,} rows] kept from the earlier run", flush=True)
            continue
        print(f"[{n:,} rows]", flush=True)
        record = measure_size(n, settings, work, lines, corpus_sha)
        result["sizes"] = [r for r in result["sizes"] if r["rows"] != n] + [record]
        finish(result, out, args.prep_min_rows)
        d = result["derived"][str(n)]
        print(
            f"  -> prep/tokenizer {fmt(d['prep_over_tokenizer'])}x ({d['prep_source']}), second run "
            f"{d['second_run_extra_s']:+.1f} s, RSS {d['rss_ratio']:.2f}x, s/step {fmt(d['step_s_ratio'])}x "
            f"(vs {d['against_rows']:,} rows); saved {out}",
            flush=True,
        )
    finish(result, out, args.prep_min_rows)
    print()
    print(markdown(result))
    print()
    print("\n".join(target_lines(result["targets"])))
    if not args.no_plot and result["sizes"]:
        try:
            plot(result, out.with_suffix(".png"))
            print(f"wrote {out} and {out.with_suffix('.png')}")
        except ImportError:  # matplotlib is the [plot] extra
            print("matplotlib missing: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
