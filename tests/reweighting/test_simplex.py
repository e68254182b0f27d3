"""Pure simplex helpers: normalisation, smoothing, exponentiated-gradient step."""

from __future__ import annotations

import math

import pytest
import torch

from mixsel.reweighting.simplex import as_domain_vector, exponentiated_step, normalize, smooth, uniform

DOMAINS = ["web", "code", "math"]


def test_normalize_and_uniform():
    assert normalize(torch.tensor([1.0, 3.0, 0.0])).tolist() == [0.25, 0.75, 0.0]
    assert uniform(4).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="negative"):
        normalize(torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        normalize(torch.zeros(3))


def test_smooth_hand_computed():
    out = smooth(torch.tensor([1.0, 0.0, 0.0]), 0.3)
    assert torch.allclose(out, torch.tensor([0.7 + 0.1, 0.1, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="smoothing"):
        smooth(torch.ones(3) / 3, 1.5)


def test_exponentiated_step_hand_computed():
    w = torch.tensor([0.5, 0.25, 0.25])
    out = exponentiated_step(w, torch.tensor([math.log(2.0), 0.0, 0.0]))
    # 0.5*2 : 0.25 : 0.25 = 1 : 0.25 : 0.25 -> divide by 1.5
    assert torch.allclose(out, torch.tensor([1 / 1.5, 0.25 / 1.5, 0.25 / 1.5], dtype=torch.float64))


def test_exponentiated_step_huge_gain_is_one_hot_not_nan():
    out = exponentiated_step(torch.ones(3) / 3, torch.tensor([1e308, 5.0, 0.0], dtype=torch.float64))
    assert out.tolist() == [1.0, 0.0, 0.0]
    zero = exponentiated_step(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([100.0, 0.0, 0.0]))
    assert zero.tolist() == [0.0, 0.5, 0.5]


def test_as_domain_vector_list_dict_and_errors():
    assert as_domain_vector({"code": 2, "web": 1, "math": 3}, DOMAINS, "w").tolist() == [1.0, 2.0, 3.0]
    assert as_domain_vector([1, 2, 3], DOMAINS, "w").tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"missing \['math'\], unknown \['books'\]"):
        as_domain_vector({"web": 1, "code": 1, "books": 1}, DOMAINS, "w")
    with pytest.raises(ValueError, match="2 entries but there are 3 domains"):
        as_domain_vector([1, 2], DOMAINS, "w")
    with pytest.raises(ValueError, match=r"not finite for domains \['code'\]"):
        as_domain_vector([1, float("nan"), 2], DOMAINS, "w")
