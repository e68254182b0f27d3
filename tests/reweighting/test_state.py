"""Checkpoint round-trips: save after 3 updates, load into a fresh object, continue identically."""

from __future__ import annotations

import io

import pytest
import torch

from mixsel import DomainStats, get_reweighter

DOMAINS = ["web", "code", "math"]


def _stream(n: int = 6) -> list[DomainStats]:
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(n):
        counts = torch.randint(0, 4, (3,), generator=g)
        counts[step % 3] = 0  # every domain is absent from some step
        loss = torch.rand(3, generator=g, dtype=torch.float64) * 4 * counts
        ref = torch.rand(3, generator=g, dtype=torch.float64) * 1.5 * counts
        grad = torch.randn(3, 5, generator=g, dtype=torch.float64) * counts.unsqueeze(-1)
        val = torch.randn(5, generator=g, dtype=torch.float64)
        tokens = counts * 3
        excess = torch.rand(3, generator=g, dtype=torch.float64) * tokens
        out.append(
            DomainStats(
                counts=counts,
                loss_sum=loss,
                ref_loss_sum=ref,
                grad=grad,
                val_grad=val,
                step=step,
                token_counts=tokens,
                excess_sum=excess,
            )
        )
    return out


CASES = [
    ("uniform", {}),
    ("static", {"domain_sizes": [10, 20, 70], "alpha": 0.3}),
    ("doremi", {}),
    ("doremi", {"absent": "zero", "clip": "domain"}),
    ("doremi", {"update_every": 2, "average": "updates", "step_size": 0.3}),
    ("dograph", {}),
    ("dograph", {"update_every": 2, "knn": 1, "alignment": "dot", "ema": 0.5}),
]


@pytest.mark.parametrize(("name", "config"), CASES)
def test_resume_continues_identically(name, config):
    stream = _stream()
    uninterrupted = get_reweighter(name, domains=DOMAINS, **config)
    expected = [uninterrupted.update(s) for s in stream]

    first = get_reweighter(name, domains=DOMAINS, **config)
    for s in stream[:3]:
        first.update(s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # checkpoints load without pickled code

    resumed = get_reweighter(name, domains=DOMAINS, **config)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.weights, expected[2])
    for s, want in zip(stream[3:], expected[3:]):
        assert torch.equal(resumed.update(s), want)
    assert resumed.log_dict() == uninterrupted.log_dict()
    assert (resumed.num_calls, resumed.num_updates) == (uninterrupted.num_calls, uninterrupted.num_updates)
    if name in ("doremi", "dograph"):
        # The stream actually moved the weights (otherwise the test could not fail).
        assert not torch.allclose(expected[-1], torch.full((3,), 1 / 3, dtype=torch.float64))
    if name == "doremi":
        assert torch.equal(resumed.average_weights, uninterrupted.average_weights)


def test_load_rejects_other_domains():
    state = get_reweighter("doremi", domains=DOMAINS).state_dict()
    other = get_reweighter("doremi", domains=["web", "math", "code"])
    with pytest.raises(ValueError, match="same domains in the same order"):
        other.load_state_dict(state)
