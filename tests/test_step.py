"""OnlineSelector: features -> selection -> diagnostics and the time split, against independent oracles."""

import torch

from mixsel import get_selector
from mixsel.config import FeatureConfig
from mixsel.step import OnlineSelector

from conftest import make_batch, make_tiny_llama


def _pool(n: int = 8) -> dict[str, torch.Tensor]:
    batch = make_batch(n=n, seq_len=10, seed=3)
    batch["domain_ids"] = torch.tensor([i % 2 for i in range(n)])
    return batch


def _head_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example LM-head weight gradients, one backward per example (the oracle)."""
    rows = []
    head = model.get_output_embeddings().weight
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        out = model(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
            labels=batch["labels"][i : i + 1],
        )
        out.loss.backward()
        rows.append(head.grad.detach().flatten().clone())
    model.zero_grad()
    return torch.stack(rows)


def test_partitionsel_step_diagnostics_match_brute_force_conflicts():
    model = make_tiny_llama(dtype=torch.float64)
    pool, val = _pool(8), make_batch(n=2, seq_len=10, seed=4)
    online = OnlineSelector(get_selector("partitionsel"), FeatureConfig(), num_domains=2, diagnostics=True)
    result = online(model, pool, 4, step=0, val_batch=val)
    picked = result.selection.indices.tolist()
    assert len(set(picked)) == 4 and all(0 <= i < 8 for i in picked)

    grads = _head_grads(model, pool)
    gram = grads @ grads.T
    want = sum(1 for a in range(4) for b in range(a + 1, 4) if gram[picked[a], picked[b]] < 0)
    assert want > 0  # the instance has conflicts to count
    assert result.metrics["select/conflicts"] == want

    m = result.metrics
    assert 0.0 < m["time/forward"] <= m["time/features"]
    assert m["time/solver"] >= 0.0


def test_forward_time_for_scalar_selectors_and_none_for_random():
    model = make_tiny_llama()
    pool = _pool(8)
    loss_based = OnlineSelector(get_selector("big_loss"), FeatureConfig(), num_domains=2)
    m = loss_based(model, pool, 4, step=0).metrics
    assert 0.0 < m["time/forward"] <= m["time/features"]

    random = OnlineSelector(get_selector("random"), FeatureConfig(), num_domains=2)
    assert random(model, pool, 4, step=0).metrics["time/forward"] == 0.0
