"""Per-example gradient feature benchmark: ghost vs materialised vs torch.func, time and peak memory.

Results go to ``benchmarks/results/features.json`` and a plot to ``benchmarks/results/features.png``.

    .venv/bin/python benchmarks/features.py --quick          # n in {32, 64}, T in {64, 128}, V 8192, H 256
    .venv/bin/python benchmarks/features.py                  # also V 4096 / H 320 (6 layers)
    .venv/bin/python benchmarks/features.py --threads 2 --ns 64 256 --ts 256

Each configuration builds a random-init LlamaForCausalLM (fp32, eager attention) and a pool of ``n``
sequences of ``T`` tokens whose first quarter is a prompt (labels -100). Every measurement runs in a
the benchmark process; peak memory is the increase of the resident set over its value before the call
(sampled every 2 ms by a thread), time the best of ``--reps`` timed calls after one warm-up. Measured, each
including the pool forward it needs:

* ``forward``: one no-grad forward of the pool (the floor);
* ``stats+factors``: :func:`forward_stats` with the LM-head factors (err [n, T, V], h [n, T, H]);
* ``gram_ghost`` / ``gram_materialize``: the LM-head self Gram [n, n] by each backend;
* ``val_ghost`` / ``val_materialize``: the cross Gram with m = 2 validation anchors [n, 2]
  (PartitionSel's per-step scores) - pool and anchors forwards included;
* ``grad_norm``: the ghost diagonal only;
* ``kron_1024``: Kronecker-projected gradients (d = 1024) and their Gram;
* ``vmap``: torch.func ``vmap(grad)`` per-sample LM-head gradients from the captured hidden states
  (body forward included) and their Gram - the usual baseline.

Ghost self-Grams predicted above ``--max-ghost-flops`` are skipped (recorded as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure(fn, reps: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Best of ``reps`` timed calls after a warm-up; peak RSS increase sampled every 2 ms by a thread.

    (Large tensors are mmap-allocated and returned on free, so the resident-set delta tracks them.)
    """
    import gc
    import threading

    gc.collect()
    base = _rss_kib("VmRSS:")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib("VmRSS:"))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    except Exception as err:  # record, keep going
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        stop.set()
        sampler.join()
    return {"seconds": round(min(times), 4), "peak_mib": round((peak[0] - base) / 1024, 1)}


def build(vocab: int, hidden: int, layers: int):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.7) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden % 64 == 0 else 5,
        num_key_value_heads=4 if hidden % 64 == 0 else 5,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def make_pool(n: int, t: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def vmap_grads(model, batch):  # type: ignore[no-untyped-def]
    """torch.func per-sample LM-head gradients given the captured head input (the usual baseline)."""
    from torch.func import functional_call, grad, vmap

    from mixsel.features.loss import output_embeddings, per_example_loss

    head = output_embeddings(model)
    cap: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda _m, a: cap.__setitem__("h", a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    handle.remove()
    params = {"weight": head.weight.detach()}

    def loss(p, h, y):  # type: ignore[no-untyped-def]
        return per_example_loss(functional_call(head, p, (h[None],)), y[None])[0]

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, cap["h"], batch["labels"])["weight"]
    return g.reshape(g.shape[0], -1)


def run_config(args: argparse.Namespace, vocab: int, hidden: int, layers: int, n: int, t: int) -> list[dict]:
    from mixsel.features import (
        KroneckerProjector,
        factor_gram,
        factor_sq_norms,
        forward_stats,
    )

    model = build(vocab, hidden, layers)
    pool = make_pool(n, t, vocab, seed=1)
    val = make_pool(2, t, vocab, seed=2)
    f_probe = forward_stats(model, make_pool(2, t, vocab, seed=3), factors=True)["lm_head"]
    tokens = n * (t - t // 4)
    ghost_flops = tokens * tokens * (vocab + hidden)
    del f_probe

    def fwd():
        with torch.no_grad():
            model(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"], use_cache=False)

    def factors():
        return forward_stats(model, pool, factors=True)["lm_head"]

    def gram(method):  # type: ignore[no-untyped-def]
        return lambda: factor_gram(factors(), method=method)

    def cross(method):  # type: ignore[no-untyped-def]
        return lambda: factor_gram(factors(), forward_stats(model, val, factors=True)["lm_head"], method=method)

    def kron():
        f = factors()
        p = KroneckerProjector(vocab, hidden, 1024, seed=0).project_factors(f)
        return p @ p.T

    def vmap_gram():
        g = vmap_grads(model, pool)
        return g @ g.T

    auto = factor_gram(factors(), method="auto")[1]
    auto_cross = factor_gram(factors(), forward_stats(model, val, factors=True)["lm_head"])[1]
    cases = {
        "forward": fwd,
        "stats+factors": factors,
        "gram_materialize": gram("materialize"),
        "gram_ghost": gram("ghost"),
        "val_materialize": cross("materialize"),
        "val_ghost": cross("ghost"),
        "grad_norm": lambda: factor_sq_norms(factors()),
        "kron_1024": kron,
        "vmap": vmap_gram,
    }
    rows = []
    floor = None
    for name, fn in cases.items():
        if args.only and name not in args.only:
            continue
        row: dict[str, Any] = {
            "feature": name,
            "vocab": vocab,
            "hidden": hidden,
            "layers": layers,
            "n": n,
            "T": t,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        }
        if name == "gram_ghost" and ghost_flops > args.max_ghost_flops:
            row["skipped"] = f"predicted {ghost_flops:.1e} > --max-ghost-flops {args.max_ghost_flops:.0e}"
        else:
            row.update(measure(fn, args.reps))
        if name == "forward":
            floor = row.get("seconds")
        if floor and "seconds" in row:
            row["x_forward"] = round(row["seconds"] / floor, 2)
        if name.startswith("gram"):
            row["auto_choice"] = auto["method"]
        if name.startswith("val"):
            row["auto_choice"] = auto_cross["method"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    configs = sorted({(r["vocab"], r["hidden"], r["n"], r["T"]) for r in rows})
    features = [f for f in dict.fromkeys(r["feature"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(features))
    for ax, key, label in ((axes[0], "seconds", "time (s, log)"), (axes[1], "peak_mib", "peak extra RSS (MiB, log)")):
        for j, feat in enumerate(features):
            vals = []
            for c in configs:
                match = [r for r in rows if (r["vocab"], r["hidden"], r["n"], r["T"]) == c and r["feature"] == feat]
                vals.append(match[0].get(key, float("nan")) if match else float("nan"))
            ax.bar([i + j * width for i in range(len(configs))], vals, width, label=feat)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([f"V{v}\nH{h}\nn{n} T{t}" for v, h, n, t in configs], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("LM-head per-example gradient features (CPU, includes the pool forward)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one model (V 8192, H 256, 4 layers)")
    ap.add_argument("--ns", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--ts", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-ghost-flops", type=float, default=4e11)
    ap.add_argument("--only", nargs="*", help="feature names to run")
    ap.add_argument("--out", type=Path, default=RESULTS / "features.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [(8192, 256, 4)] if args.quick else [(8192, 256, 4), (4096, 320, 6)]
    rows: list[dict] = []
    t0 = time.time()
    for vocab, hidden, layers in models:
        for n in args.ns:
            for t in args.ts:
                rows.extend(run_config(args, vocab, hidden, layers, n, t))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("wrote", args.out)
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
