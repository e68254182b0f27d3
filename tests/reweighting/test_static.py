"""uniform and static reweighters; registry lookup of every reweighter."""

from __future__ import annotations

import math

import pytest
import torch

from mixsel import DomainStats, available_reweighters, get_reweighter
from mixsel.reweighting import (
    DoGraphReweighter,
    DoReMiReweighter,
    Reweighter,
    StaticReweighter,
    UniformReweighter,
    temperature_weights,
)

DOMAINS = ["web", "code", "math"]


def _stats() -> DomainStats:
    return DomainStats(counts=torch.tensor([3, 0, 1]), loss_sum=torch.tensor([6.0, 0.0, 9.0]))


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [
        ("uniform", UniformReweighter, {}),
        ("static", StaticReweighter, {"weights": [1, 1, 2]}),
        ("doremi", DoReMiReweighter, {}),
        ("dograph", DoGraphReweighter, {}),
    ],
)
def test_registry_builds_each_by_name(name, cls, config):
    assert name in available_reweighters()
    r = get_reweighter(name, domains=DOMAINS, **config)
    assert type(r) is cls
    assert r.name == name
    assert isinstance(r, Reweighter)
    assert r.domains == DOMAINS
    assert r.mode in ("sampling", "loss", "both")
    assert math.isclose(float(r.weights.sum()), 1.0)


_MINIMAL_OPTIONS = {"static": {"weights": [1, 1, 2]}}


@pytest.mark.parametrize("name", available_reweighters())
def test_every_registered_reweighter_declares_what_it_needs(name):
    """The loops read these attributes (never probe with getattr): each has the declared type."""
    r = get_reweighter(name, domains=DOMAINS, **_MINIMAL_OPTIONS.get(name, {}))
    assert isinstance(r, Reweighter)
    assert type(r.needs_reference) is bool and type(r.needs_grad) is bool
    for attr in ("proposal_weights", "average_weights"):
        value = getattr(r, attr)
        assert value is None or (torch.is_tensor(value) and value.shape == (len(DOMAINS),))
    logged = r.log_dict()
    assert {f"weights/{d}" for d in DOMAINS} <= set(logged)
    assert all(isinstance(v, float) for v in logged.values())


def test_declared_needs_for_the_training_loop():
    needs = {
        name: (r.needs_reference, r.needs_grad)
        for name in available_reweighters()
        for r in [get_reweighter(name, domains=DOMAINS, **_MINIMAL_OPTIONS.get(name, {}))]
    }
    assert needs["doremi"] == (True, False)
    assert needs["dograph"] == (False, True)
    assert needs["uniform"] == needs["static"] == (False, False)
    assert get_reweighter("doremi", domains=DOMAINS).proposal_weights.tolist() == [1 / 3] * 3
    assert get_reweighter("uniform", domains=DOMAINS).average_weights is None


def test_registry_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="dograph, doremi, static, uniform"):
        get_reweighter("doremy", domains=DOMAINS)


def test_uniform_never_changes_and_logs():
    r = get_reweighter("uniform", domains=DOMAINS, mode="both")
    assert r.mode == "both"
    out = r.update(_stats())
    assert torch.equal(out, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert r.log_dict() == {f"weights/{d}": 1 / 3 for d in DOMAINS}
    assert r.num_updates == 1


def test_static_list_dict_and_temperature():
    r = get_reweighter("static", domains=DOMAINS, weights=[2, 1, 1])
    assert r.weights.tolist() == [0.5, 0.25, 0.25]
    r = get_reweighter("static", domains=DOMAINS, weights={"math": 0, "web": 3, "code": 1})
    assert r.weights.tolist() == [0.75, 0.25, 0.0]
    r.update(_stats())
    assert r.weights.tolist() == [0.75, 0.25, 0.0]
    # p_d ∝ n_d^0.5 with sizes 1, 4, 16 -> 1 : 2 : 4
    r = get_reweighter("static", domains=DOMAINS, domain_sizes=[1, 4, 16], alpha=0.5)
    assert torch.allclose(r.weights, torch.tensor([1 / 7, 2 / 7, 4 / 7], dtype=torch.float64))
    r = get_reweighter("static", domains=DOMAINS, domain_sizes={"web": 10, "code": 30, "math": 60})
    assert torch.allclose(r.weights, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))


def test_temperature_extremes_stay_finite():
    w = temperature_weights(torch.tensor([1e300, 1.0, 0.0], dtype=torch.float64), alpha=5.0)
    assert w.tolist() == [1.0, 0.0, 0.0]
    assert temperature_weights(torch.tensor([5.0, 7.0, 0.0]), alpha=0.0).tolist() == [0.5, 0.5, 0.0]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "exactly one of weights"),
        ({"weights": [1, 1, 1], "domain_sizes": [1, 1, 1]}, "exactly one of weights"),
        ({"weights": [1, -1, 1]}, "negative"),
        ({"weights": [0, 0, 0]}, "positive"),
        ({"domain_sizes": [1, 2, 3], "alpha": -1.0}, "alpha"),
        ({"weights": [1, 1, 1], "mode": "sample"}, "mode='sample'"),
        ({"weights": [1, 1, 1], "update_every": 0}, "update_every"),
    ],
)
def test_static_errors(config, match):
    with pytest.raises(ValueError, match=match):
        get_reweighter("static", domains=DOMAINS, **config)


def test_domain_list_errors():
    with pytest.raises(ValueError, match="duplicate"):
        get_reweighter("uniform", domains=["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        get_reweighter("uniform", domains=[])


def test_stats_shape_mismatch_is_explained():
    r = get_reweighter("uniform", domains=DOMAINS)
    bad = DomainStats(counts=torch.tensor([1, 1]), loss_sum=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="3 domains"):
        r.update(bad)
