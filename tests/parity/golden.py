"""Per-step picks, losses and domain weights of ``mixsel train`` on a micro model: the refactor's oracle.

``python tests/parity/golden.py`` records :data:`CASES` into ``train_golden.json`` beside this file
(run it only to record a *deliberate* change of behaviour, and say so in the commit);
``tests/parity/test_parity_golden.py`` reruns the cases and compares. Each case is a few steps of the
embedded corpus with the micro Llama (``tests/_fast.py``), selections logged.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _fast import FAST  # noqa: E402

GOLDEN = HERE / "train_golden.json"

COMMON = [
    "train.max_steps=3",
    "train.log_selections=true",
    "train.log_every=1",
    "eval.every=100",
    "eval.exact_match=0",
    "eval.max_per_domain=2",
    "train.plots=false",
]

SELECTORS = [
    "random",
    "stratified",
    "partitionsel",
    "per_domain",
    "colm",
    "greats",
    "gradmatch",
    "craig",
    "grad_norm",
    "big_loss",
    "middle_ppl",
    "completion_length",
    "least_confidence",
    "hidden_fl",
]

#: name -> overrides. ``{reference}`` is replaced by a reference model folder (DoReMi).
CASES: dict[str, list[str]] = {f"{s}/uniform": [f"selection.method={s}"] for s in SELECTORS}
CASES.update(
    {
        f"{s}/{r}": [f"selection.method={s}", f"reweighting.method={r}", *extra]
        for s in SELECTORS
        for r, extra in (
            ("doremi", ["reweighting.reference_model={reference}"]),
            ("dograph", ["reweighting.projection_dim=32"]),
            ("doge", ["reweighting.projection_dim=32"]),
        )
    }
)
CASES.update(
    {
        # sampling-mode static weights: the pools follow them
        "random/static": [
            "selection.method=random",
            "reweighting.method=static",
            "reweighting.options.weights=[0.4,0.1,0.1,0.1,0.1,0.1,0.1]",
        ],
        # gradient accumulation inside a step
        "partitionsel/uniform/micro2": ["selection.method=partitionsel", "train.micro_batch_size=2"],
        "dograph/micro2": [
            "selection.method=random",
            "reweighting.method=dograph",
            "reweighting.projection_dim=32",
            "train.micro_batch_size=2",
        ],
        "craig/doremi/loss_mode": [
            "selection.method=craig",
            "reweighting.method=doremi",
            "reweighting.reference_model={reference}",
        ],
    }
)


def make_reference(folder: Path) -> Path:
    """A reference model for DoReMi: the micro model's initialisation, saved by a 0-step run."""
    from mixsel.config import load_config
    from mixsel.train import train

    out = folder / "reference"
    if not (out / "final").exists():
        train(load_config(None, [*FAST, *COMMON, "train.max_steps=0", f"train.output_dir={out}"]), progress=False)
    return out / "final"


def run_case(name: str, folder: Path, reference: Path) -> list[dict]:
    """Run one case; returns per step: picked example ids, selection weights, loss, domain weights."""
    from mixsel.config import load_config
    from mixsel.train import train

    out = folder / name.replace("/", "_")
    extra = [o.replace("{reference}", str(reference)) for o in CASES[name]]
    train(load_config(None, [*FAST, *COMMON, *extra, f"train.output_dir={out}"]), progress=False)
    picks = [json.loads(line) for line in (out / "selections.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return step_records(picks, metrics, grad_norm="train/grad_norm")


def step_records(picks: list[dict], rows: list[dict], *, grad_norm: str) -> list[dict]:
    """Per step: picked example ids, selection weights, loss, grad norm (under the key ``grad_norm``)
    and domain weights, from ``selections.jsonl`` lines and the loop's metric rows of the same steps."""
    steps = []
    for pick, row in zip(picks, rows, strict=True):
        assert pick["step"] == row["step"]
        steps.append(
            {
                "step": pick["step"],
                "examples": pick["examples"],
                "selection_weights": pick["weights"],
                "loss": row["train/loss"],
                "grad_norm": row[grad_norm],
                "domain_weights": {k: v for k, v in row.items() if k.startswith("weights/")},
            }
        )
    return steps


def check_steps(
    got: list[dict], want: list[dict], *, loss_rel: float, grad_rel: float, weights_rel: float, weights_abs: float
) -> None:
    """Assert two runs' :func:`step_records` agree: the same picks every step, the numbers within tolerance."""
    import math

    import pytest

    assert [s["step"] for s in got] == [s["step"] for s in want]
    for g, w in zip(got, want):
        assert g["examples"] == w["examples"], f"step {w['step']}: other examples picked"
        assert g["selection_weights"] == pytest.approx(w["selection_weights"], rel=1e-5, abs=1e-6)
        assert math.isclose(g["loss"], w["loss"], rel_tol=loss_rel), f"step {w['step']}: loss"
        assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=grad_rel), f"step {w['step']}: grad norm"
        assert g["domain_weights"] == pytest.approx(w["domain_weights"], rel=weights_rel, abs=weights_abs)


def record(names: list[str] | None = None) -> dict[str, list[dict]]:
    """Run ``names`` (default: every case) in a temporary folder."""
    import torch

    torch.set_num_threads(1)
    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = make_reference(Path(tmp))
        for name in names or list(CASES):
            out[name] = run_case(name, Path(tmp), reference)
            print(name, [s["loss"] for s in out[name]], flush=True)
    return out


if __name__ == "__main__":
    # python tests/parity/golden.py [--missing]: record every case, or only those not in the file yet
    known = json.loads(GOLDEN.read_text()) if "--missing" in sys.argv and GOLDEN.exists() else {}
    todo = [name for name in CASES if name not in known]
    recorded = {**known, **record(todo)}
    GOLDEN.write_text(json.dumps({name: recorded[name] for name in CASES}, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(todo)} cases recorded)")
