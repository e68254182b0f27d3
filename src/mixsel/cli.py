"""The ``mixsel`` command line.

mixsel train   [--config FILE] [a.b=c ...]    one experiment (default: the embedded default)
               [--resume | --overwrite] [--force-resume] [-q | -v]
mixsel train --help-config [--config FILE]    every config field with its value and what it does
mixsel compare [--config FILE] [a.b=c ...] [-q | -v]
                                              several methods, same data and seeds; table + plots
mixsel select  --features FILE --method NAME --k K [--out FILE] [--option key=value ...]
                                              offline selection from saved features (a dict of
                                              domains, feature tensors, optional source_sizes)
mixsel methods                                registered selectors and reweighters, one line each: the
                                              kind, the cost class (none, forward, gradients,
                                              zeroth-order) and what it needs from the training loop
mixsel --version                              mixsel, torch and transformers versions

Output: the result table on stdout; by default also the start lines (run folder, data, threads, the
data summary) and a progress bar; ``-q`` prints the result only, ``-v`` adds INFO logs
(``MIXSEL_LOG=LEVEL`` sets the level directly). Bad input gets one line on stderr,
``mixsel: error: <what is wrong and how to fix it>``, and exit status 2 (a ``mixsel.errors.MixselError``,
an ``OSError`` or a ``ValueError``); ``MIXSEL_DEBUG=1`` shows the traceback instead. Any other exception
(a ``KeyError``, ``TypeError``... that is not a ``MixselError``) is a bug: one line with the file and line
it came from, ``mixsel: internal error: ...``, and exit status 1. A full disk is bad input (status 2),
also when torch or safetensors report it with their own exception types.

SIGTERM or SIGINT (Ctrl-C) during training: the current step finishes, a checkpoint is saved, one line
``mixsel: stopped by SIGTERM after step N; checkpoint saved in ...; resume with --resume`` and exit
status 143 (SIGTERM) or 130 (SIGINT), what the signal alone would give. Before training starts and
after the last step's checkpoint, Ctrl-C stops at once (``mixsel: interrupted``, status 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from mixsel.errors import ConfigError, DataError, MixselError, OptionError

__all__ = ["main"]

DEFAULT_COMPARE = "configs/compare.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (and exit status 2) like every other mixsel error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_options(items: list[str]) -> dict[str, Any]:
    from mixsel.config import parse_yaml

    options = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--option {item!r} must look like key=value (e.g. --option budget=uniform)")
        key, raw = item.split("=", 1)
        options[key.strip()] = parse_yaml(raw, f"--option {item!r}")
    return options


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The ``train.*`` overrides of ``--resume`` / ``--overwrite`` / ``--force-resume``."""
    flags = (("resume", "train.resume=true"), ("overwrite", "train.overwrite=true"))
    flags += (("force_resume", "train.force_resume=true"),)
    return [override for name, override in flags if getattr(args, name, False)]


def _cmd_train(args: argparse.Namespace) -> int:
    from mixsel.config import describe_config, load_config

    if args.help_config:
        # the fields with their comments, with the values of --config and overrides when given
        cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
        print("\n".join(describe_config(cfg)))
        return 0
    from mixsel.train import train

    if args.force_resume and not args.resume:
        raise ConfigError("--force-resume only applies with --resume; add --resume")
    result = train(load_config(args.config, [*args.overrides, *_flag_overrides(args)]), progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if "stopped_at" in result:
        print(f"stopped after step {result['stopped_at']} (train.stop_after); continue it with --resume")
        return 0
    keys = [k for k in result if k.startswith(("test/", "val/loss_mean", "val/loss_worst"))]
    for key in sorted(keys):
        print(f"{key:40s} {result[key]:.4f}")
    t = result["time"]  # this process's wall seconds by part (a resumed run: since the resume)
    print(
        f"time: data {t['data_s']:.1f} s, model {t['model_s']:.1f} s, train {t['train_s']:.1f} s, "
        f"eval {t['eval_s']:.1f} s, total {t['total_s']:.1f} s; run folder {result['config']['train']['output_dir']}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mixsel.compare import run_compare

    config = args.config or DEFAULT_COMPARE
    if not Path(config).exists():
        raise FileNotFoundError(f"compare config {config!r} not found; pass --config FILE (see configs/compare.yaml)")
    out = run_compare(config, args.overrides, progress=not args.quiet)
    print(out["table"])
    print(f"\nresults: {out['output_dir']}/summary.json, plots: {out['output_dir']}/plots/")
    return 0


def _load_features(path: str) -> dict[str, Any]:
    """The ``torch.save``'d dict of ``mixsel select --features``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError / DataError: one line for a missing, empty, unreadable, truncated or
            code-carrying file, or one that is not a dict with ``domains``.
    """
    import torch

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--features {path!r}: no such file")
    if file.is_dir():
        raise DataError(f"--features {path!r} is a folder; pass the file written by torch.save")
    if file.stat().st_size == 0:
        raise DataError(f"--features {path!r} is empty; write it with torch.save({{'domains': ..., ...}}, path)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle of objects at all (text, another format)
            raise DataError(
                f"--features {path!r} is not a readable torch.save file; save it again with torch.save"
            ) from None
        what = f" (it references {found.group(1)})"
        raise DataError(
            f"--features {path!r} holds pickled Python objects that torch.load(weights_only=True) refuses{what}; "
            "mixsel never runs code from a file: save only tensors, lists and numbers with torch.save"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        raise DataError(
            f"--features {path!r} is not a readable torch.save file ({type(err).__name__}: "
            f"{str(err).strip()[:80] or 'no data'}); it may be truncated or a text file: save it again with torch.save"
        ) from None
    if not isinstance(data, dict) or "domains" not in data:
        raise DataError(f"--features {path!r} must hold a dict with 'domains' (LongTensor[n]) and feature tensors")
    return data


def _as_tensor(value: Any, name: str, path: str) -> Any:
    import torch

    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"--features {path!r}: {name!r} is not a tensor or a list of numbers") from None


def _cmd_select(args: argparse.Namespace) -> int:
    import torch

    from mixsel.registry import get_selector
    from mixsel.selection import Pool

    try:
        selector = get_selector(args.method, **_parse_options(args.option))
    except OptionError as err:  # an unknown or missing keyword option
        raise ConfigError(f"--option for selector {args.method!r}: {err}") from None
    data = _load_features(args.features)
    domains = _as_tensor(data["domains"], "domains", args.features)
    if domains.is_floating_point() or domains.dtype == torch.bool or domains.dim() != 1:
        raise DataError(
            f"--features {args.features!r}: 'domains' must be a 1-D integer tensor of domain ids, "
            f"got {domains.dtype} of shape {tuple(domains.shape)}"
        )
    meta = ("domains", "num_domains", "source_sizes")
    feats = {k: _as_tensor(v, k, args.features) for k, v in data.items() if k not in meta}
    missing = sorted(set(selector.requires) - set(feats))
    if missing:
        raise DataError(
            f"selector {args.method!r} needs features {missing}; --features {args.features!r} has {sorted(feats)}"
        )
    if domains.numel() == 0:
        raise DataError(f"--features {args.features!r} holds no candidates ('domains' is empty)")
    num_domains = data.get("num_domains", int(domains.max()) + 1)
    if isinstance(num_domains, torch.Tensor) and num_domains.numel() == 1:
        num_domains = int(num_domains)
    if not isinstance(num_domains, int) or isinstance(num_domains, bool):
        raise DataError(f"--features {args.features!r}: 'num_domains' must be an integer, got {num_domains!r}")
    pool = Pool(
        domains=domains.long(),
        num_domains=num_domains,
        features={k: v for k, v in feats.items() if k in selector.requires},
        seed=args.seed,
        source_sizes=data.get("source_sizes"),  # the dataset's examples per domain (CoLM's small sources)
    )
    sel = selector.select(pool, args.k)
    record = {"method": args.method, "indices": sel.indices.tolist(), "weights": sel.weights.tolist()}
    if args.out:
        Path(args.out).write_text(json.dumps(record))
    print(json.dumps(record))
    return 0


#: What each cost class of ``mixsel methods`` costs: a selector per pool, a reweighter per training step.
COST_CLASSES: dict[str, str] = {
    "none": "no model pass",
    "forward": "one no-grad forward: of the pool (selector); of a reference model on the trained rows (reweighter)",
    "gradients": "per-example gradient features of the pool (selector); the trained rows' domain gradients, and "
    "validation gradients on update steps if it reads them (reweighter)",
    "zeroth-order": "two perturbed no-grad forwards of the pool (SPSA)",
    "unknown": "requires a feature mixsel does not compute",
}


def _declared(table: dict[str, Any], name: str, build: Any) -> Any:
    """The instance ``build()`` makes (its defaults), or the registered class when it needs options."""
    try:
        return build()
    except Exception:  # a method without defaults (static: weights=...): read its class attributes
        return table[name]


def selector_cost(requires: frozenset[str] | set[str]) -> str:
    """The cost class of a selector, from the features it declares in ``requires``.

    Args:
        requires: feature names (``mixsel.types.FEATURE_NAMES``).

    Returns:
        ``"none"`` (no model pass), ``"forward"`` (one no-grad pool forward), ``"gradients"``
        (per-example gradient features), ``"zeroth-order"`` (SPSA: two perturbed forwards) or
        ``"unknown"`` (a feature name mixsel does not compute).
    """
    from mixsel.types import FEATURE_NAMES, GRADIENT_FEATURES, SCALAR_FEATURES, ZEROTH_ORDER_FEATURES

    requires = set(requires)
    if requires - FEATURE_NAMES:
        return "unknown"
    if requires & ZEROTH_ORDER_FEATURES:
        return "zeroth-order"
    if requires & GRADIENT_FEATURES:
        return "gradients"
    return "forward" if requires & SCALAR_FEATURES else "none"


def method_rows() -> list[tuple[str, str, str, str]]:
    """One ``(name, kind, cost, needs)`` row per registered selector and reweighter.

    Everything is read from what the methods declare, so the listing cannot drift from them:
    a selector's ``requires`` (and ``needs_source_sizes``), built with its default options; a
    reweighter's ``mode`` (its class's ``default_mode`` when it cannot be built without options),
    ``needs_reference``, ``needs_grad`` and the optional ``needs_val_grad`` (default: ``needs_grad``).
    """
    from mixsel.registry import (
        _REWEIGHTERS,
        _SELECTORS,
        available_reweighters,
        available_selectors,
        get_reweighter,
        get_selector,
    )

    rows = []
    for name in available_selectors():
        sel = _declared(_SELECTORS, name, lambda name=name: get_selector(name))
        requires = frozenset(getattr(sel, "requires", frozenset()))
        needs = [f + (" (validation anchors)" if f in ("val_scores", "val_gram") else "") for f in sorted(requires)]
        if getattr(sel, "needs_source_sizes", False):
            needs.append("source sizes")
        rows.append((name, "selector", selector_cost(requires), ", ".join(needs) or "nothing"))
    for name in available_reweighters():
        rw = _declared(_REWEIGHTERS, name, lambda name=name: get_reweighter(name, domains=["a", "b"]))
        mode = getattr(rw, "mode", None) if not isinstance(rw, type) else None
        mode = mode or getattr(rw, "default_mode", None) or getattr(rw, "mode", "?")
        needs_grad = bool(getattr(rw, "needs_grad", False))
        needs_val_grad = getattr(rw, "needs_val_grad", needs_grad)  # optional; a property when read off a class
        needs = []
        if getattr(rw, "needs_reference", False):
            needs.append("reference-model losses (needs_reference)")
        if needs_grad:
            val = needs_val_grad if isinstance(needs_val_grad, bool) else needs_grad
            needs.append("domain gradients" + (" + validation gradients" if val else "") + " (needs_grad)")
        cost = "gradients" if needs_grad else "forward" if needs else "none"
        rows.append((name, "reweighter", cost, f"mode {mode}; " + (", ".join(needs) or "domain loss stats only")))
    return rows


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = method_rows()
    width = max(len(row[0]) for row in rows) + 2
    print(f"{'name':{width}s}{'kind':12s}{'cost':14s}needs from the loop")
    for name, kind, cost, needs in rows:
        print(f"{name:{width}s}{kind:12s}{cost:14s}{needs}")
    print("\nselectors as built with their default options; cost classes:")
    for cost in sorted({row[2] for row in rows}, key=list(COST_CLASSES).index):
        print(f"  {cost:14s}{COST_CLASSES[cost]}")
    return 0


def version_line() -> str:
    """``mixsel <version> (torch <v>, transformers <v>)``, read from the installed distributions.

    The versions come from the package metadata, so this imports neither torch nor transformers;
    an optional package that is absent shows as ``not installed``.
    """
    from importlib.metadata import PackageNotFoundError, version

    from mixsel import __version__

    found = []
    for package in ("torch", "transformers", "trl"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            if package != "trl":  # trl is listed only when installed
                found.append(f"{package} not installed")
    return f"mixsel {__version__} ({', '.join(found)})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_line` and exit 0 (computed only when asked for)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(version_line())
        parser.exit(0)


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_true", help="print the result only (no start lines, no progress bar)"
    )
    group.add_argument("-v", "--verbose", action="store_true", help="also print INFO logs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixsel", description="Online minibatch selection and domain reweighting for LM data mixtures."
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the mixsel, torch and transformers versions and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train one experiment")
    p.add_argument("--config", default=None, help="experiment YAML (default: the embedded default experiment)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.max_steps=20")
    _add_verbosity(p)
    folder = p.add_mutually_exclusive_group()
    folder.add_argument(
        "--resume", action="store_true", help="continue the run in train.output_dir from its checkpoint"
    )
    folder.add_argument(
        "--overwrite", action="store_true", help="replace the run in train.output_dir (its files are deleted)"
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="with --resume: continue even though fields that alter the run changed since the checkpoint",
    )
    p.add_argument(
        "--help-config", action="store_true", help="print every config field, its value and what it does, then exit"
    )
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("compare", help="compare several methods on the same data and seeds")
    p.add_argument("--config", default=None, help=f"compare YAML (default: {DEFAULT_COMPARE})")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides applied to every run")
    _add_verbosity(p)
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("select", help="offline selection from saved features (torch.save'd dict)")
    p.add_argument("--features", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], help="selector option key=value (repeatable)")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_select)
    p = sub.add_parser(
        "methods", help="registered selectors and reweighters: what each needs from the loop and its cost"
    )
    p.set_defaults(func=_cmd_methods)
    return parser


# errors that mean "the input is wrong": one line naming it and the fix, exit status 2. A plain
# ValueError is one too: libraries (transformers, datasets, tokenizers) reject a user's values with it.
_EXPLAINED = (MixselError, OSError, ValueError)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (never a bare errno such as ``2``)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _mixsel_path(filename: str) -> str | None:
    """``mixsel/<module>.py`` for a file of the mixsel package, else None."""
    try:
        return "mixsel/" + Path(filename).resolve().relative_to(Path(__file__).resolve().parent).as_posix()
    except (OSError, ValueError):
        return None


def _short(filename: str) -> str:
    """A library file from its package folder on (``torch/nn/functional.py``), any other file in full."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages") :])
    return filename


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised, ``file:line in function``, for a bug report.

    The last frame of the traceback; when that is outside mixsel (torch, transformers), the last
    mixsel frame too: ``torch/nn/functional.py:3104 in cross_entropy, from mixsel/engine.py:88 in loss``.
    """
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "an unknown place"
    last = frames[-1]
    where = f"{_mixsel_path(last.filename) or _short(last.filename)}:{last.lineno} in {last.name}"
    if _mixsel_path(last.filename) is None:
        ours = [f for f in frames if _mixsel_path(f.filename)]
        if ours:
            where += f", from {_mixsel_path(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}"
    return where


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting ``a.b=c`` overrides come after flags too (``train --resume a.b=c``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    level = os.environ.get("MIXSEL_LOG", "INFO" if getattr(args, "verbose", False) else "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        level = "WARNING"  # an unknown MIXSEL_LOG level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as stop:
        status = getattr(stop, "exit_status", None)  # mixsel.train.StoppedBySignal: a checkpoint was saved
        if status is not None:
            line = str(stop)
            if args.command == "compare":  # compare has no --resume: running it again resumes the run
                line = line.replace("resume with --resume", "run the same mixsel compare again to continue")
            if os.environ.get("RANK", "0") == "0":
                print(line, file=sys.stderr)
            return int(status)
        print("mixsel: interrupted", file=sys.stderr)
        return 130
    except _EXPLAINED as exc:
        if os.environ.get("MIXSEL_DEBUG"):
            raise
        print(f"mixsel: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("MIXSEL_DEBUG"):
            raise
        print(
            f"mixsel: internal error: {type(exc).__name__}: {_one_line(exc)} at {_where(exc)} (a bug: rerun with "
            "MIXSEL_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
