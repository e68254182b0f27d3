"""Solver benchmark: mixsel facility location vs apricot-select, mixsel OMP vs scikit-learn.

Same inputs, one run, side by side; results go to ``benchmarks/results/solvers.json`` and a plot to
``benchmarks/results/solvers.png``.

    .venv/bin/python benchmarks/solvers.py --quick            # n in {512, 2048}, d = 512
    .venv/bin/python benchmarks/solvers.py                    # n in {512, 2048, 8192}, d in {512, 4096}
    .venv/bin/python benchmarks/solvers.py --sizes 512 2048 --dims 512 --threads 2

* Facility location: features x ~ N(0, 1)^[n, 32], similarity = max(D) - D with D the pairwise L1
  distance (CoLM Eq. 8), k = n / 4. apricot's FacilityLocationSelection(metric='precomputed') with the
  naive and lazy optimizers vs ``mixsel.solvers.facility_location`` naive and lazy. Ranking agreement =
  length of the common prefix of the two pick orders.
* OMP: features G ~ N(0, 1)^[n, d], target t = G^T a + noise with a sparse, k = n / 4, signed weights,
  no budgets: scikit-learn's OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False) on
  (G^T, t) vs ``mixsel.solvers.omp(..., nonnegative=False, tol=0)``, float64 and float32.
* Partition-matroid OMP (non-negative weights, 8 groups with proportional budgets), mixsel only.

A run whose predicted time (cubic extrapolation from the previous size) exceeds ``--time-limit`` is
skipped with the reason recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def bench_facility_location(sizes, time_limit, seed):
    from apricot import FacilityLocationSelection

    from mixsel.solvers import facility_location, pairwise_l1, similarity_from_distance

    # warm up numba JIT so compile time is not counted
    warm = np.random.default_rng(0).random((20, 20))
    for opt in ("naive", "lazy"):
        FacilityLocationSelection(5, metric="precomputed", optimizer=opt, verbose=False).fit(warm)
    rows, prev = [], {}
    for n in sizes:
        k = n // 4
        naive_ranking = None
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 32, generator=g)
        sim = similarity_from_distance(pairwise_l1(x))
        sim_np = sim.double().numpy()
        for opt in ("naive", "lazy"):
            row = {"n": n, "k": k, "optimizer": opt}
            ours, t_ours = timed(facility_location, sim, k, method=opt)
            row.update(mixsel_s=t_ours, mixsel_objective=ours.info["objective"])
            est = predicted(prev, f"apricot-{opt}", n)
            if est > time_limit:
                row.update(apricot_s=None, skipped=f"apricot {opt} predicted {est:.0f}s > --time-limit {time_limit}s")
            else:
                sel = FacilityLocationSelection(k, metric="precomputed", optimizer=opt, verbose=False)
                _, t_ap = timed(sel.fit, sim_np)
                prev[f"apricot-{opt}"] = (n, t_ap)
                ranking = [int(i) for i in sel.ranking]
                if opt == "naive":
                    naive_ranking = ranking
                row.update(
                    apricot_s=t_ap,
                    apricot_objective=float(np.sum(sel.gains)),
                    speedup=t_ap / t_ours,
                    identical_ranking=bool(list(map(int, ranking)) == ours.indices.tolist()),
                    common_prefix=common_prefix(ranking, ours.indices.tolist()),
                    overlap=len(set(ranking) & set(ours.indices.tolist())) / k,
                )
            if naive_ranking is not None:
                row["identical_to_apricot_naive"] = naive_ranking == ours.indices.tolist()
            rows.append(row)
            print("facility_location", json.dumps(row), flush=True)
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

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fl = results["facility_location"]
    ax = axes[0]
    for opt, marker in (("naive", "o"), ("lazy", "s")):
        r = [x for x in fl if x["optimizer"] == opt]
        ax.plot([x["n"] for x in r], [x["mixsel_s"] for x in r], marker=marker, label=f"mixsel {opt}")
        ra = [x for x in r if x.get("apricot_s")]
        ax.plot([x["n"] for x in ra], [x["apricot_s"] for x in ra], marker=marker, ls="--", label=f"apricot {opt}")
    ax.set(xscale="log", yscale="log", xlabel="n (k = n/4)", ylabel="seconds", title="facility location")
    ax.legend()
    ax = axes[1]
    for d in sorted({x["d"] for x in results["omp"]}):
        r = [x for x in results["omp"] if x["d"] == d]
        ax.plot([x["n"] for x in r], [x["mixsel_f32_s"] for x in r], marker="o", label=f"mixsel f32 d={d}")
        ax.plot([x["n"] for x in r], [x["mixsel_f64_s"] for x in r], marker="^", label=f"mixsel f64 d={d}")
        rs = [x for x in r if x.get("sklearn_s")]
        ax.plot([x["n"] for x in rs], [x["sklearn_s"] for x in rs], marker="s", ls="--", label=f"sklearn d={d}")
    ax.set(xscale="log", yscale="log", xlabel="n (k = n/4)", ylabel="seconds", title="OMP (signed, no budgets)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: n in {512, 2048}, d = 512")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="pool sizes n (k = n/4)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="feature dims d for OMP")
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
    sizes = args.sizes or ([512, 2048] if args.quick else [512, 2048, 8192])
    dims = args.dims or ([512] if args.quick else [512, 4096])
    pomp = args.partition_omp or ([2048, 512, 512] if args.quick else [8192, 4096, 1024])

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads):
        results = {
            "meta": {
                "command": "benchmarks/solvers.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
                "torch": torch.__version__,
                "threads": args.threads,
                "machine": platform.machine(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_average_at_start": os.getloadavg(),
            },
            "facility_location": bench_facility_location(sizes, args.time_limit, args.seed),
            "omp": bench_omp(sizes, dims, args.time_limit, args.seed),
            "partition_omp": bench_partition_omp(*pomp, groups=8, seed=args.seed),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
