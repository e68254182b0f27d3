"""The ``mixsel`` command line.

mixsel train   [--config FILE] [a.b=c ...]    one experiment (default: the embedded default)
mixsel train --help-config [--config FILE]    every config field with its value and what it does
mixsel compare [--config FILE] [a.b=c ...]    several methods, same data and seeds; table + plots
mixsel select  --features FILE --method NAME --k K [--out FILE] [--option key=value ...]
                                              offline selection from saved features (a dict of
                                              domains, feature tensors, optional source_sizes)
mixsel methods                                registered selectors and reweighters
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]

DEFAULT_COMPARE = "configs/compare.yaml"


def _parse_options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        options[key] = yaml.safe_load(raw)
    return options


def _cmd_train(args: argparse.Namespace) -> int:
    from mixsel.config import describe_config, load_config

    if args.help_config:
        # the fields with their comments, with the values of --config and overrides when given
        cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
        print("\n".join(describe_config(cfg)))
        return 0
    from mixsel.train import train

    overrides = [*args.overrides, *(["train.resume=true"] if args.resume else [])]
    result = train(load_config(args.config, overrides), progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if "stopped_at" in result:
        print(f"stopped after step {result['stopped_at']} (train.stop_after); resume with train.resume=true")
        return 0
    keys = [k for k in result if k.startswith(("test/", "val/loss_mean", "val/loss_worst"))]
    for key in sorted(keys):
        print(f"{key:40s} {result[key]:.4f}")
    print(f"wall time {result['wall_time_s']:.1f}s; run folder {result['config']['train']['output_dir']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mixsel.compare import run_compare

    config = args.config or DEFAULT_COMPARE
    if not Path(config).exists():
        raise SystemExit(f"compare config {config!r} not found; pass --config FILE (see configs/compare.yaml)")
    out = run_compare(config, args.overrides, progress=not args.quiet)
    print(out["table"])
    print(f"\nresults: {out['output_dir']}/summary.json, plots: {out['output_dir']}/plots/")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    import torch

    from mixsel.registry import get_selector
    from mixsel.selection import Pool

    data = torch.load(args.features, map_location="cpu", weights_only=False)
    if "domains" not in data:
        raise SystemExit(f"{args.features} must hold a dict with 'domains' (LongTensor[n]) and feature tensors")
    domains = torch.as_tensor(data["domains"], dtype=torch.long)
    selector = get_selector(args.method, **_parse_options(args.option))
    feats = {k: torch.as_tensor(v) for k, v in data.items() if k not in ("domains", "num_domains", "source_sizes")}
    missing = sorted(set(selector.requires) - set(feats))
    if missing:
        raise SystemExit(f"selector {args.method!r} needs features {missing}; {args.features} has {sorted(feats)}")
    num_domains = int(data.get("num_domains", int(domains.max()) + 1))
    sizes = data.get("source_sizes")  # the dataset's examples per domain (CoLM's small sources)
    pool = Pool(domains=domains, num_domains=num_domains, features=feats, seed=args.seed, source_sizes=sizes)
    sel = selector.select(pool, args.k)
    record = {"method": args.method, "indices": sel.indices.tolist(), "weights": sel.weights.tolist()}
    if args.out:
        Path(args.out).write_text(json.dumps(record))
    print(json.dumps(record))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mixsel.registry import available_reweighters, available_selectors

    print("selectors:   " + ", ".join(available_selectors()))
    print("reweighters: " + ", ".join(available_reweighters()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixsel", description="Online minibatch selection and domain reweighting for LM data mixtures."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one experiment")
    p.add_argument("--config", default=None, help="experiment YAML (default: the embedded default experiment)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.max_steps=20")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint (train.resume=true)")
    p.add_argument(
        "--help-config", action="store_true", help="print every config field, its value and what it does, then exit"
    )
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("compare", help="compare several methods on the same data and seeds")
    p.add_argument("--config", default=None, help=f"compare YAML (default: {DEFAULT_COMPARE})")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides applied to every run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("select", help="offline selection from saved features (torch.save'd dict)")
    p.add_argument("--features", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], help="selector option key=value (repeatable)")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_select)
    p = sub.add_parser("methods", help="list registered selectors and reweighters")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MIXSEL_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, TypeError) as exc:
        if os.environ.get("MIXSEL_DEBUG"):
            raise
        print(f"mixsel: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
