"""The cheap reweighting paths of the training loop: DoGraph's domain gradients captured in the train
backward, ``reweighting.amortize`` (statistics only on the last step of each update window)."""

from __future__ import annotations

import json

import pytest
import torch

from mixsel import bookkeeping
from mixsel.config import load_config

from _fast import FAST

pytest.importorskip("transformers")


def _cfg(tmp_path, *extra):
    return load_config(None, [*FAST, f"train.output_dir={tmp_path}", "eval.exact_match=0", *extra])


def _counting(monkeypatch, name):
    calls = []
    original = getattr(bookkeeping, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bookkeeping, name, wrapped)
    return calls


@pytest.mark.parametrize("rows", ["trained", "pool"])
def test_dograph_domain_gradients_from_trained_rows_or_the_pool(tmp_path, monkeypatch, rows):
    from mixsel.train import train

    captured = _counting(monkeypatch, "captured_domain_gradients")
    separate = _counting(monkeypatch, "domain_gradients")
    result = train(
        _cfg(tmp_path, "train.max_steps=3", "reweighting.method=dograph", f"reweighting.grad_rows={rows}"),
        progress=False,
    )
    assert (len(captured), len(separate)) == ((3, 0) if rows == "trained" else (0, 3))
    weights = torch.tensor(result["final_weights"], dtype=torch.float64)
    assert abs(float(weights.sum()) - 1) < 1e-9 and float((weights - 1 / 7).abs().max()) > 1e-6


def test_amortized_dograph_computes_statistics_once_per_window(tmp_path, monkeypatch):
    from mixsel.train import train

    captured = _counting(monkeypatch, "captured_domain_gradients")
    val = _counting(monkeypatch, "validation_gradient")
    train(
        _cfg(
            tmp_path,
            "train.max_steps=4",
            "reweighting.method=dograph",
            "reweighting.update_every=2",
            "reweighting.amortize=true",
        ),
        progress=False,
    )
    assert len(captured) == 2 and len(val) == 2  # steps 1 and 3 (0-based) only
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    w = [[r[k] for k in sorted(r) if k.startswith("weights/")] for r in rows]
    # metrics row s holds the weights the step used: updates after steps 2 and 4 (1-based)
    assert w[0] == w[1] and w[1] != w[2] and w[2] == w[3]


def test_amortized_doremi_runs_the_reference_once_per_window(tmp_path, monkeypatch):
    from mixsel.train import train

    ref_dir = tmp_path / "ref"
    train(_cfg(ref_dir, "train.max_steps=1"), progress=False)
    ref_calls = _counting(monkeypatch, "reference_losses")
    result = train(
        _cfg(
            tmp_path / "proxy",
            "train.max_steps=6",
            "reweighting.method=doremi",
            f"reweighting.reference_model={ref_dir / 'final'}",
            "reweighting.update_every=3",
            "reweighting.amortize=true",
        ),
        progress=False,
    )
    assert len(ref_calls) == 2
    assert float((torch.tensor(result["average_weights"]) - 1 / 7).abs().max()) > 1e-6


def test_grad_rows_is_checked():
    with pytest.raises(ValueError, match="grad_rows"):
        load_config(None, ["reweighting.grad_rows=everything"])
