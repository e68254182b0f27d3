"""What the Hugging Face and TRL trainers train, old code against new: the issue's four behaviours.

The issue: before ``SelectionTrainer`` / ``SelectionSFTTrainer`` ran the step engine of ``mixsel train``
(old commit 78a0258), the trainers

1. dropped a reweighter's *sampling* weights: ``reweighter="static"`` with weights 0.8/0.1/0.1
   trained ~1/3 of each domain on a balanced set, and ``reweighter="dograph"`` (sampling mode by
   default) trained bit-identical losses to ``reweighter=None`` - a silent no-op;
2. selected once per *micro*-batch: with ``gradient_accumulation_steps=4`` and
   ``per_device_train_batch_size=1`` the selector ran 4 times per optimiser step with ``k=1``;
3. hence, with ``k=1``, the reference budget rounding (``smallest_first``) of ``partitionsel``,
   ``colm`` and ``stratified`` gave the leftover pick to the lowest domain id: on three balanced
   domains the first domain got most of the rows and the third none;
4. the same for the TRL trainer.

This benchmark measures each behaviour with a tiny 2-layer Llama on CPU, for the old code (extracted
with ``git archive 78a0258`` into ``--old-src``'s parent, run with ``PYTHONPATH`` pointing at it) and
the working tree's code (``PYTHONPATH=src``), each group of runs in one subprocess per code, old and
new interleaved (the order flips from one group to the next). Trained rows are read from the
``input_ids`` that ``trainer.compute_loss`` receives in training mode (the first token encodes the
domain); selector calls from a wrapper around ``trainer.online``; step losses from the Trainer's log
history. ``rounding="carry"`` (a new selector option) runs only with the new code::

    python benchmarks/hf_semantics.py            # old and new, every item; ~2 min on 2 cores
    python benchmarks/hf_semantics.py --quick    # new code only, in-process, 1-2 steps (the smoke test)

Writes ``benchmarks/results/hf_semantics.json`` (settings, every run's raw counts, the per-item
summary, versions, commits) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "hf_semantics.json"
OLD_COMMIT = "78a0258"
DEFAULT_OLD_SRC = Path("/tmp/mixsel_old/src")

DOMAINS = ["a", "b", "c"]
SEQ = 10
MARK = 90  # input_ids[0] = MARK + domain id: a trained row's domain is read from its first token
STATIC_WEIGHTS = [0.8, 0.1, 0.1]

#: arguments every run gets (accepted by the old and the new SelectionTrainingArguments)
COMMON = dict(
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    seed=0,
    learning_rate=5e-3,
    disable_tqdm=True,
    reweighting_projection_dim=64,
    reweighting_val_per_domain=2,
)


# ---- the runs ---------------------------------------------------------------------------------


def _case(item: str, name: str, trainer: str, args: dict[str, Any], codes=("old", "new"), **extra: Any) -> dict:
    return {"item": item, "name": name, "trainer": trainer, "args": args, "codes": list(codes), **extra}


def plan(quick: bool = False) -> list[dict[str, Any]]:
    """The groups of runs: ``{"group", "cases": [...]}``; one subprocess per group and code."""
    s1 = 2 if quick else 48  # item 1 (static): 4 rows a step
    s1d = 2 if quick else 6  # item 1 (dograph against None)
    s2 = 1 if quick else 3  # item 2 (accumulation)
    s3 = 2 if quick else 8  # item 3 (rounding at k=1 per micro-step)
    per_domain = 32
    groups = []
    trainers = ("hf", "trl") if importlib.util.find_spec("trl") is not None else ("hf",)
    for tr in trainers:
        static = dict(
            selector="random",
            reweighter="static",
            reweighter_options={"weights": STATIC_WEIGHTS},
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            pool_factor=2,
            max_steps=s1,
        )
        base_dg = dict(selector="random", per_device_train_batch_size=4, gradient_accumulation_steps=1, pool_factor=2)
        groups.append(
            {
                "group": f"{tr}:1",
                "cases": [
                    _case("1_static", "static 0.8/0.1/0.1 (sampling)", tr, static),
                    _case("1_dograph", "reweighter=None", tr, {**base_dg, "reweighter": None, "max_steps": s1d}),
                    _case(
                        "1_dograph", "reweighter=dograph", tr, {**base_dg, "reweighter": "dograph", "max_steps": s1d}
                    ),
                ],
                "per_domain": per_domain,
            }
        )
        accum = dict(
            selector="random", per_device_train_batch_size=1, gradient_accumulation_steps=4, pool_factor=4, max_steps=s2
        )
        cases = [_case("2_accumulation", "random, batch 1 x accumulation 4", tr, accum)]
        selectors = ("partitionsel", "colm", "stratified") if tr == "hf" and not quick else ("partitionsel",)
        for sel in selectors:
            args = dict(
                selector=sel, per_device_train_batch_size=1, gradient_accumulation_steps=4, pool_factor=4, max_steps=s3
            )
            cases.append(_case("3_rounding", f"{sel} default", tr, args))
            carry = {**args, "selector_options": {"rounding": "carry"}}
            cases.append(_case("3_rounding", f"{sel} rounding=carry", tr, carry, codes=("new",)))
        groups.append({"group": f"{tr}:2-3", "cases": cases, "per_domain": per_domain})
    return groups


# ---- the worker (runs inside a subprocess with one code on PYTHONPATH) ---------------------------


def make_tiny_llama(vocab_size: int = 97, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random-init LlamaForCausalLM (as tests/conftest.py make_tiny_llama)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.train()
    return model


def make_dataset(n_per_domain=(12, 8, 4), seed: int = 0):
    """Fixed-length rows; the first token encodes the domain, the first two tokens are prompt (-100)
    (as tests/integrations/test_hf.py make_dataset)."""
    import datasets
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "domain": []}
    for d, count in enumerate(n_per_domain):
        for _ in range(count):
            ids = torch.randint(1, 80, (SEQ,), generator=g)
            ids[0] = MARK + d
            labels = ids.clone()
            labels[:2] = -100
            rows["input_ids"].append(ids.tolist())
            rows["labels"].append(labels.tolist())
            rows["domain"].append(DOMAINS[d])
    return datasets.Dataset.from_dict(rows)


_RUN_IDS = itertools.count()


class _Wrap:
    """Stands in for ``trainer.online`` (an attribute in the old code, a property in the new)."""

    def __init__(self, inner: Any, call: Any) -> None:
        self._inner, self._call = inner, call

    def __call__(self, *a: Any, **kw: Any) -> Any:
        return self._call(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def run_case(case: dict[str, Any], per_domain: int, workdir: str) -> dict[str, Any]:
    """Train one case and return what it trained (domains per step), the selector calls and the losses."""
    import torch

    args_in = dict(case["args"])
    train = make_dataset((per_domain,) * 3, seed=0)
    val = make_dataset((4, 4, 4), seed=1)
    out_dir = os.path.join(workdir, f"{case['trainer']}_{next(_RUN_IDS)}")
    if case["trainer"] == "hf":
        from mixsel.integrations.hf import SelectionTrainer, SelectionTrainingArguments

        args = SelectionTrainingArguments(output_dir=out_dir, domains=DOMAINS, **COMMON, **args_in)
        trainer = SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=train, eval_dataset=val)
    else:
        from mixsel.data.embedded import load_embedded_tokenizer
        from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer

        tok = load_embedded_tokenizer()
        args = SelectionSFTConfig(
            output_dir=out_dir, domains=DOMAINS, bf16=False, gradient_checkpointing=False, **COMMON, **args_in
        )
        trainer = SelectionSFTTrainer(
            model=make_tiny_llama(vocab_size=len(tok)),
            args=args,
            train_dataset=train,
            eval_dataset=val,
            processing_class=tok,
        )

    calls: list[dict[str, int]] = []
    trained: list[dict[str, Any]] = []
    online_call = trainer.online.__call__
    compute_loss = trainer.compute_loss

    def spy_online(model: Any, batch: dict, k: int, **kw: Any) -> Any:
        result = online_call(model, batch, k, **kw)
        calls.append({"step": int(trainer.state.global_step), "k": int(k), "pool": int(batch["input_ids"].shape[0])})
        return result

    def spy_loss(model: Any, inputs: dict, *a: Any, **kw: Any) -> Any:
        if model.training:
            dom = (inputs["input_ids"][:, 0].detach().cpu() - MARK).tolist()
            trained.append({"step": int(trainer.state.global_step), "domains": [int(d) for d in dom]})
        return compute_loss(model, inputs, *a, **kw)

    trainer.online = _Wrap(trainer.online, spy_online)
    trainer.compute_loss = spy_loss
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0

    steps = int(trainer.state.global_step)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rows = [d for t in trained for d in t["domains"]]
    counts = [rows.count(d) for d in range(len(DOMAINS))]
    weights = None
    rc = trainer.reweighting_callback
    if rc is not None:
        weights = [float(w) for w in torch.as_tensor(rc.weights).tolist()]
    ks = Counter(c["k"] for c in calls)
    return {
        "item": case["item"],
        "name": case["name"],
        "trainer": case["trainer"],
        "args": args_in,
        "steps": steps,
        "seconds": round(seconds, 2),
        "trained_rows": len(rows),
        "trained_counts": counts,
        "trained_share": [round(c / max(len(rows), 1), 4) for c in counts],
        "trained_per_step": [[d for t in trained if t["step"] == s for d in t["domains"]] for s in range(steps)],
        "selector_calls": len(calls),
        "selector_calls_per_step": round(len(calls) / max(steps, 1), 3),
        "k_per_call": {str(k): n for k, n in sorted(ks.items())},
        "pool_per_call": sorted({c["pool"] for c in calls}),
        "step_losses": [float(h["loss"]) for h in logs],
        "final_weights": weights,
    }


def worker(spec_path: str, out_path: str, expect_src: str) -> int:
    """Run one group's cases with the ``mixsel`` on ``PYTHONPATH`` and write their results."""
    import torch

    torch.set_num_threads(1)
    import mixsel

    where = str(Path(mixsel.__file__).resolve())
    if not where.startswith(str(Path(expect_src).resolve())):
        raise SystemExit(f"mixsel imported from {where}, expected under {expect_src}")
    spec = json.loads(Path(spec_path).read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in spec["cases"]:
            results.append(run_case(case, spec["per_domain"], tmp))
    Path(out_path).write_text(json.dumps({"mixsel_file": where, "runs": results}))
    return 0


# ---- the driver ---------------------------------------------------------------------------------


def _run_group(group: dict, code: str, src: Path, tmp: str) -> dict[str, Any]:
    cases = [c for c in group["cases"] if code in c["codes"]]
    tag = group["group"].replace(":", "_")
    spec = Path(tmp) / f"{tag}_{code}_spec.json"
    out = Path(tmp) / f"{tag}_{code}_out.json"
    spec.write_text(json.dumps({"cases": cases, "per_domain": group["per_domain"]}))
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec), "--worker-out", str(out)]
    cmd += ["--expect-src", str(src)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"{code} run of {group['group']} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    print(f"  {group['group']:8s} {code}: {len(cases)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in data["runs"]:
        r["code"] = code
    return data


def _in_process(group: dict) -> dict[str, Any]:
    import torch

    import mixsel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_case(c, group["per_domain"], tmp) for c in group["cases"] if "new" in c["codes"]]
    finally:
        torch.set_num_threads(threads)
    for r in runs:
        r["code"] = "new"
    return {"mixsel_file": str(Path(mixsel.__file__).resolve()), "runs": runs}


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def _find(runs: list[dict], code: str, trainer: str, name: str) -> dict | None:
    return next((r for r in runs if r["code"] == code and r["trainer"] == trainer and r["name"] == name), None)


def _shares(r: dict | None) -> str:
    return "-" if r is None else "/".join(f"{s:.2f}" for s in r["trained_share"]) + f" (n={r['trained_rows']})"


def _calls(r: dict | None) -> str:
    if r is None:
        return "-"
    ks = ", ".join(f"k={k}" for k in r["k_per_call"])
    return f"{r['selector_calls_per_step']:g} calls/step, {ks}"


def _loss_diff(none: dict | None, dg: dict | None) -> dict[str, Any] | None:
    if none is None or dg is None:
        return None
    diffs = [abs(a - b) for a, b in zip(none["step_losses"], dg["step_losses"])]
    return {
        "identical": none["step_losses"] == dg["step_losses"],
        "max_abs_diff": max(diffs) if diffs else 0.0,
        "steps_differing": sum(d != 0 for d in diffs),
        "steps": len(diffs),
        "dograph_final_weights": dg["final_weights"],
    }


def _dg_text(d: dict | None) -> str:
    if d is None:
        return "-"
    if d["identical"]:
        return f"identical to None ({d['steps']} steps)"
    return f"differ in {d['steps_differing']}/{d['steps']} steps (max abs diff {d['max_abs_diff']:.2e})"


def summarise(runs: list[dict]) -> tuple[dict[str, Any], list[str]]:
    """The per-item summary and the markdown table lines."""
    summary: dict[str, Any] = {}
    lines = [
        "| item | trainer | measure | old (78a0258) | new | new, rounding=carry |",
        "|---|---|---|---|---|---|",
    ]
    for tr in ("hf", "trl"):
        label = "HF" if tr == "hf" else "TRL"
        s: dict[str, Any] = {}
        name = "static 0.8/0.1/0.1 (sampling)"
        old, new = _find(runs, "old", tr, name), _find(runs, "new", tr, name)
        s["1_static_trained_share"] = {c: r and r["trained_share"] for c, r in (("old", old), ("new", new))}
        lines.append(f"| 1 static | {label} | trained share a/b/c | {_shares(old)} | {_shares(new)} | |")
        dg = {
            c: _loss_diff(_find(runs, c, tr, "reweighter=None"), _find(runs, c, tr, "reweighter=dograph"))
            for c in ("old", "new")
        }
        s["1_dograph_vs_none"] = dg
        lines.append(f"| 1 dograph | {label} | step losses vs None | {_dg_text(dg['old'])} | {_dg_text(dg['new'])} | |")
        name = "random, batch 1 x accumulation 4"
        old, new = _find(runs, "old", tr, name), _find(runs, "new", tr, name)
        s["2_selector_calls"] = {
            c: r and {"per_step": r["selector_calls_per_step"], "k_per_call": r["k_per_call"]}
            for c, r in (("old", old), ("new", new))
        }
        lines.append(f"| 2 accumulation | {label} | selector calls | {_calls(old)} | {_calls(new)} | |")
        for sel in ("partitionsel", "colm", "stratified"):
            old, new = _find(runs, "old", tr, f"{sel} default"), _find(runs, "new", tr, f"{sel} default")
            carry = _find(runs, "new", tr, f"{sel} rounding=carry")
            if old is None and new is None and carry is None:
                continue
            s[f"3_{sel}_trained_share"] = {
                c: r and r["trained_share"] for c, r in (("old", old), ("new", new), ("new_carry", carry))
            }
            lines.append(
                f"| 3 {sel} | {label} | trained share a/b/c | {_shares(old)} | {_shares(new)} | {_shares(carry)} |"
            )
        summary[tr] = s
    return summary, lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="new code only, in-process, 1-2 steps a run")
    parser.add_argument("--old-src", default=str(DEFAULT_OLD_SRC), help="src/ of the old code (git archive 78a0258)")
    parser.add_argument("--out", default=str(RESULT), help="result JSON path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--expect-src", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        return worker(ns.worker, ns.worker_out, ns.expect_src)

    groups = plan(quick=ns.quick)
    old_src = Path(ns.old_src)
    new_src = ROOT / "src"
    if not ns.quick and not (old_src / "mixsel" / "__init__.py").exists():
        raise SystemExit(
            f"no old code at {old_src}: mkdir -p {old_src.parent} && git -C {ROOT} archive {OLD_COMMIT} | "
            f"tar -x -C {old_src.parent}"
        )
    runs: list[dict] = []
    files: dict[str, str] = {}
    t0 = time.perf_counter()
    if ns.quick:
        for group in groups:
            data = _in_process(group)
            files["new"] = data["mixsel_file"]
            runs += data["runs"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for i, group in enumerate(groups):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for code in order:
                    data = _run_group(group, code, old_src if code == "old" else new_src, tmp)
                    files[code] = data["mixsel_file"]
                    runs += data["runs"]
    summary, lines = summarise(runs)
    commits = {"new": _git("rev-parse", "HEAD"), "new_note": "HEAD plus the working tree's uncommitted changes, if any"}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    commits["new_tree_dirty"] = bool(dirty) if dirty != "unknown" else None
    if not ns.quick:
        commits["old"] = OLD_COMMIT
    result = {
        "settings": {
            "quick": ns.quick,
            "model": "LlamaForCausalLM, 2 layers, hidden 32, 4 heads (2 kv), random init, float32, CPU",
            "data": f"balanced: {groups[0]['per_domain']} rows per domain of {DOMAINS}, {SEQ} tokens, "
            f"first token {MARK}+domain id; eval/validation 4 per domain",
            "common_args": COMMON,
            "threads": 1,
            "groups": groups,
        },
        "summary": summary,
        "runs": runs,
        "mixsel_files": files,
        "versions": _versions(),
        "commits": commits,
        "wall_s": round(time.perf_counter() - t0, 1),
        "table": lines,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(res if isinstance(res, int) else 0)
