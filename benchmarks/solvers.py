"""Solver benchmark: mixsel against apricot-select, a plain numpy GREATS loop and scikit-learn.

Every ratio is measured side by side in one run, on the same inputs; results go to
``benchmarks/results/solvers.json`` and the ratios to ``benchmarks/results/solvers.png``.

    .venv/bin/python benchmarks/solvers.py --quick            # FL n = 2048; GREATS n = 64..512; OMP n = 512
    .venv/bin/python benchmarks/solvers.py                    # FL n in {512, 2048}; OMP n in {512, 2048, 8192}
    .venv/bin/python benchmarks/solvers.py --fl-sizes 2048 --repeats 5 --threads 2

* Facility location: features x ~ N(0, 1)^[n, 32], similarity = max(D) - D with D the pairwise L1
  distance (CoLM Eq. 8), k = n / 4. apricot's FacilityLocationSelection(metric='precomputed') with
  its naive and lazy optimizers (the faster of the two is the reference) against every optimiser of
  ``mixsel.solvers.facility_location``; each time is the best of ``--repeats`` runs. The ranking of
  each mixsel optimiser is compared with apricot's naive greedy (identical = the same k picks in
  the same order). Target (issue 16): mixsel >= 10x the reference, identical ranking.
* GREATS: g ~ N(0, 1)^[n, 256], a validation gradient v near the mean of n / 8 of them, scores
  s = G v, Gram K = G G^T, k = n / 4, n in {64, 128, 256, 512}, at a weak (eta = 1e-4) and a strong
  (eta = 0.05) learning rate (the JSON says how many picks differ from the top-k order). Reference: a
  straightforward numpy loop of the greedy on numpy arrays (score_j = eta <g_j, v>; k times: pick
  the argmax, subtract eta^2 K[i*, :], mark it picked), written here from the description of the
  official code. Measured: ``mixsel.solvers.greats_greedy`` end to end (torch tensors in, input
  checks, a ``Selection`` out), its inner loop alone on the same numpy arrays, and, for scale, the
  reference loop packaged as a selector needs it (torch tensors in, a ``Selection`` out, no
  checks); the median of many calls each. Target (issue 16): mixsel at least as fast as the
  reference.
* OMP: features G ~ N(0, 1)^[n, d], target t = G^T a + noise with a sparse, k = n / 4, signed
  weights, no budgets: scikit-learn's OrthogonalMatchingPursuit(n_nonzero_coefs=k,
  fit_intercept=False) on (G^T, t) against ``mixsel.solvers.omp(..., nonnegative=False, tol=0)``,
  float64 and float32; and a partition-matroid OMP (non-negative weights, 8 groups), mixsel only.

An OMP baseline run whose predicted time (cubic extrapolation from the previous size) exceeds
``--time-limit`` is skipped with the reason recorded (facility location is never skipped). The
machine's load average is recorded at the start and the end: the ratios are only comparable
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def common_prefix(a, b) -> int:
    m = min(len(a), len(b))
    for i in range(m):
        if int(a[i]) != int(b[i]):
            return i
    return m


def predicted(prev: dict[str, tuple[int, float]], key: str, n: int) -> float:
    if key not in prev:
        return 0.0
    n0, t0 = prev[key]
    return t0 * (n / n0) ** 3


def bench_facility_location(sizes, repeats, seed):
    from apricot import FacilityLocationSelection

    from mixsel.solvers import facility_location, pairwise_l1, similarity_from_distance
    from mixsel.solvers.facility_location import EXACT_OPTIMIZERS, OPTIMIZERS

    # warm up numba JIT so compile time is not counted
    warm = np.random.default_rng(0).random((20, 20))
    for opt in ("naive", "lazy"):
        FacilityLocationSelection(5, metric="precomputed", optimizer=opt, verbose=False).fit(warm)
    rows = []
    for n in sizes:
        k = n // 4
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 32, generator=g)
        sim = similarity_from_distance(pairwise_l1(x))
        sim_np = sim.double().numpy()
        row: dict = {"n": n, "k": k, "repeats": repeats, "apricot": {}, "mixsel": {}}
        selectors = {
            opt: FacilityLocationSelection(k, metric="precomputed", optimizer=opt, verbose=False)
            for opt in ("naive", "lazy")
        }  # never skipped: n = 2048 is the target size
        contenders = {f"apricot {opt}": (sel.fit, (sim_np,), {}) for opt, sel in selectors.items()}
        contenders |= {f"mixsel {m}": (facility_location, (sim, k), {"method": m}) for m in OPTIMIZERS}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        outputs = {}
        for _ in range(repeats):  # interleaved, so that a change of machine load hits every contender
            for name, (fn, args, kwargs) in contenders.items():
                outputs[name], secs = timed(fn, *args, **kwargs)
                times[name].append(secs)
        naive_ranking = [int(i) for i in selectors["naive"].ranking]
        for opt, sel in selectors.items():
            ts = times[f"apricot {opt}"]
            ranking = [int(i) for i in sel.ranking]
            row["apricot"][opt] = {
                "best_s": min(ts),
                "median_s": float(np.median(ts)),
                "objective": float(np.sum(sel.gains)),
                "common_prefix_with_apricot_naive": common_prefix(naive_ranking, ranking),
            }
        reference = min(row["apricot"], key=lambda o: row["apricot"][o]["best_s"])
        ref_s = row["apricot"][reference]["best_s"]
        row["reference"] = f"apricot {reference}"
        for method in OPTIMIZERS:
            ours, ts = outputs[f"mixsel {method}"], times[f"mixsel {method}"]
            picks = ours.indices.tolist()
            row["mixsel"][method] = {
                "best_s": min(ts),
                "median_s": float(np.median(ts)),
                "exact_optimiser": method in EXACT_OPTIMIZERS,
                "objective": ours.info["objective"],
                "evaluations": ours.info["evaluations"],
                "speedup_vs_reference": ref_s / min(ts),
                "speedup_vs_apricot_naive": row["apricot"]["naive"]["best_s"] / min(ts),
                "speedup_vs_apricot_lazy": row["apricot"]["lazy"]["best_s"] / min(ts),
                "identical_to_apricot_naive": naive_ranking == picks,
                "common_prefix_with_apricot_naive": common_prefix(naive_ranking, picks),
            }
        rows.append(row)
        print("facility_location", json.dumps(row), flush=True)
    return rows


def numpy_greats(scores: np.ndarray, gram: np.ndarray, k: int, eta: float) -> list[int]:
    """Reference: a straightforward numpy loop of the GREATS greedy (see the module docstring)."""
    score = eta * scores
    picks = []
    for _ in range(k):
        i = int(np.argmax(score))
        picks.append(i)
        score -= eta * eta * gram[i]
        score[i] = -np.inf
    return picks


def median_call(fn, *args, min_seconds: float = 0.3, **kwargs) -> tuple[float, float]:
    """(median, best) seconds of one call, over as many calls as fit in ~``min_seconds``."""
    fn(*args, **kwargs)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 20:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), min(times)


def mixsel_greats_loop(scores: np.ndarray, gram: np.ndarray, k: int, eta: float):
    """mixsel's inner GREATS loop alone, on the reference's numpy arrays (no checks, no torch)."""
    from mixsel.solvers.matroid import _greats_loop

    return _greats_loop(scores * eta, gram, k, eta * eta, None)


def packaged_numpy_greats(scores: torch.Tensor, gram: torch.Tensor, k: int, eta: float):
    """The reference loop as a selector would call it: torch tensors in, a Selection out, no checks."""
    from mixsel.types import Selection

    picks = numpy_greats(scores.numpy(), gram.numpy(), k, eta)
    return Selection(indices=torch.tensor(picks), weights=torch.ones(k, dtype=gram.dtype))


def bench_greats(sizes, etas, seed):
    from mixsel.solvers import greats_greedy

    rows = []
    for eta in etas:
        for n in sizes:
            k = n // 4
            g = torch.Generator().manual_seed(seed + n)
            G = torch.randn(n, 256, generator=g, dtype=torch.float64)
            v = G[: max(1, n // 8)].mean(0) + 0.1 * torch.randn(256, generator=g, dtype=torch.float64)
            scores, gram = G @ v, G @ G.T
            s_np, K_np = scores.numpy(), gram.numpy()
            ref_picks = numpy_greats(s_np, K_np, k, eta)
            ours = greats_greedy(scores, gram, k, lr=eta)
            loop_picks, _ = mixsel_greats_loop(s_np, K_np, k, eta)
            ref_med, ref_best = median_call(numpy_greats, s_np, K_np, k, eta)
            e2e_med, e2e_best = median_call(greats_greedy, scores, gram, k, lr=eta)
            loop_med, loop_best = median_call(mixsel_greats_loop, s_np, K_np, k, eta)
            packaged_med, _ = median_call(packaged_numpy_greats, scores, gram, k, eta)
            top_k = torch.topk(scores, k).indices.tolist()
            row = {
                "n": n,
                "k": k,
                "eta": eta,
                "reference_median_s": ref_med,
                "mixsel_median_s": e2e_med,
                "mixsel_loop_median_s": loop_med,
                "reference_best_s": ref_best,
                "mixsel_best_s": e2e_best,
                "mixsel_loop_best_s": loop_best,
                "ratio_reference_over_mixsel": ref_med / e2e_med,
                "ratio_reference_over_mixsel_loop": ref_med / loop_med,
                "reference_packaged_median_s": packaged_med,
                "ratio_packaged_reference_over_mixsel": packaged_med / e2e_med,
                "identical_picks": ref_picks == ours.indices.tolist() == loop_picks.tolist(),
                "picks_differing_from_top_k_order": sum(a != b for a, b in zip(ref_picks, top_k)),
            }
            rows.append(row)
            print("greats", json.dumps(row), flush=True)
    return rows


def bench_omp(sizes, dims, time_limit, seed):
    from sklearn.linear_model import OrthogonalMatchingPursuit

    from mixsel.solvers import omp

    rows, prev = [], {}
    for d in dims:
        for n in sizes:
            k = n // 4
            g = torch.Generator().manual_seed(seed)
            G = torch.randn(n, d, generator=g, dtype=torch.float64)
            a = torch.zeros(n, dtype=torch.float64)
            m = max(1, k // 2)
            a[torch.randperm(n, generator=g)[:m]] = torch.rand(m, generator=g, dtype=torch.float64)
            t = G.T @ a + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
            row = {"n": n, "d": d, "k": k}
            ours64, t64 = timed(omp, G, t, k, nonnegative=False, tol=0.0)
            ours32, t32 = timed(omp, G.float(), t.float(), k, nonnegative=False, tol=0.0)
            row.update(
                mixsel_f64_s=t64,
                mixsel_f64_residual=ours64.residual,
                mixsel_f64_picks=len(ours64),
                mixsel_f32_s=t32,
                mixsel_f32_residual=ours32.residual,
            )
            key = f"sklearn-{d}"
            est = predicted(prev, key, n)
            if est > time_limit:
                row.update(sklearn_s=None, skipped=f"sklearn predicted {est:.0f}s > --time-limit {time_limit}s")
            else:
                X, y = G.T.numpy(), t.numpy()
                model = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, t_sk = timed(model.fit, X, y)
                prev[key] = (n, t_sk)
                res = np.linalg.norm(X @ model.coef_ - y) / np.linalg.norm(y)
                support = set(np.flatnonzero(model.coef_).tolist())
                row.update(
                    sklearn_s=t_sk,
                    sklearn_residual=float(res),
                    sklearn_picks=len(support),
                    speedup_f64=t_sk / t64,
                    speedup_f32=t_sk / t32,
                    support_overlap=len(support & set(ours64.indices.tolist())) / max(1, len(support)),
                )
            rows.append(row)
            print("omp", json.dumps(row), flush=True)
    return rows


def bench_partition_omp(n, d, k, groups, seed):
    from mixsel.solvers import omp

    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g)
    t = G[: n // 8].mean(0) + 0.05 * torch.randn(d, generator=g)
    grp = torch.randint(0, groups, (n,), generator=g)
    counts = torch.bincount(grp, minlength=groups)
    budgets = (counts * k) // n + 1
    sel, secs = timed(omp, G, t, k, groups=grp, budgets=budgets, nonnegative=True, fill=True)
    row = {
        "n": n,
        "d": d,
        "k": k,
        "groups": groups,
        "seconds": secs,
        "residual": sel.residual,
        "picks": len(sel),
        "filled": sel.info["filled"],
        "nnls_refactorizations": sel.info["nnls_refactorizations"],
        "budgets_respected": bool((torch.bincount(grp[sel.indices], minlength=groups) <= budgets).all()),
    }
    print("partition_omp", json.dumps(row), flush=True)
    return [row]


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    fl = results["facility_location"]
    methods = list(fl[0]["mixsel"]) if fl else []
    width = 0.8 / max(1, len(fl))
    for i, row in enumerate(fl):
        ratios = [row["mixsel"][m].get("speedup_vs_reference", np.nan) for m in methods]
        xs = np.arange(len(methods)) + i * width
        bars = ax.bar(xs, ratios, width, label=f"n={row['n']}, k={row['k']} (vs {row['reference']})")
        for bar, m in zip(bars, methods):
            same = row["mixsel"][m].get("identical_to_apricot_naive")
            ax.annotate(
                "same ranking" if same else "differs",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(10, color="k", ls="--", lw=1, label="target 10x")
    ax.set_xticks(np.arange(len(methods)) + width * (len(fl) - 1) / 2, methods)
    ax.set(yscale="log", ylabel="apricot best / mixsel (time ratio)", title="facility location vs apricot")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    gr = results["greats"]
    for eta in sorted({r["eta"] for r in gr}):
        r = [x for x in gr if x["eta"] == eta]
        ax.plot(
            [x["n"] for x in r],
            [x["ratio_reference_over_mixsel"] for x in r],
            marker="o",
            label=f"greats_greedy, eta={eta:g}",
        )
        ax.plot(
            [x["n"] for x in r],
            [x["ratio_reference_over_mixsel_loop"] for x in r],
            marker="s",
            ls=":",
            label=f"inner loop only, eta={eta:g}",
        )
    ax.axhline(1, color="k", ls="--", lw=1, label="target 1x")
    ax.set(xscale="log", xlabel="n (k = n/4)", ylabel="numpy loop / mixsel (time ratio)", title="GREATS greedy")
    ax.legend(fontsize=7)

    ax = axes[2]
    for d in sorted({x["d"] for x in results["omp"]}):
        r = [x for x in results["omp"] if x["d"] == d and x.get("sklearn_s")]
        ax.plot([x["n"] for x in r], [x["speedup_f64"] for x in r], marker="^", label=f"float64, d={d}")
        ax.plot([x["n"] for x in r], [x["speedup_f32"] for x in r], marker="o", label=f"float32, d={d}")
    ax.axhline(1, color="k", ls="--", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="n (k = n/4)",
        ylabel="sklearn / mixsel (time ratio)",
        title="OMP (signed, no budgets) vs scikit-learn",
    )
    ax.legend(fontsize=7)
    load = results["meta"]["load_average_at_start"]
    fig.suptitle(
        f"ratios measured side by side in one run; load average at start {load[0]:.2f} "
        f"({results['meta']['cpu_count']} CPUs)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="FL n = 2048, OMP n = 512 / d = 512, small partition OMP")
    p.add_argument("--fl-sizes", type=int, nargs="+", default=None, help="facility location sizes n (k = n/4)")
    p.add_argument("--greats-sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="GREATS sizes n")
    p.add_argument("--greats-etas", type=float, nargs="+", default=[1e-4, 0.05], help="GREATS learning rates")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="OMP pool sizes n (k = n/4)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="feature dims d for OMP")
    p.add_argument("--repeats", type=int, default=3, help="facility location: best of this many runs each")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS / numba threads")
    p.add_argument("--time-limit", type=float, default=120.0, help="skip a baseline predicted slower (s)")
    p.add_argument(
        "--partition-omp",
        type=int,
        nargs=3,
        default=None,
        metavar=("N", "D", "K"),
        help="partition-matroid OMP size (default 8192 4096 1024; 2048 512 512 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "solvers.json")
    args = p.parse_args(argv)
    fl_sizes = args.fl_sizes or ([2048] if args.quick else [512, 2048])
    sizes = args.sizes or ([512] if args.quick else [512, 2048, 8192])
    dims = args.dims or ([512] if args.quick else [512, 4096])
    pomp = args.partition_omp or ([2048, 512, 512] if args.quick else [8192, 4096, 1024])

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    meta = {
        "command": "benchmarks/solvers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": os.getloadavg(),
    }
    print("load average at start", meta["load_average_at_start"], flush=True)
    with threadpool_limits(args.threads):
        results = {
            "meta": meta,
            "facility_location": bench_facility_location(fl_sizes, args.repeats, args.seed),
            "greats": bench_greats(args.greats_sizes, args.greats_etas, args.seed),
            "omp": bench_omp(sizes, dims, args.time_limit, args.seed),
            "partition_omp": bench_partition_omp(*pomp, groups=8, seed=args.seed),
        }
    meta["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
