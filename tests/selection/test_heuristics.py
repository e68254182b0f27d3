"""big_loss, grad_norm, completion_length, least_confidence, middle_ppl: golden rankings."""

import math

import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool

DOMAINS = torch.tensor([0, 0, 0, 1, 1, 1])


def _pool(name, values):
    return Pool(domains=DOMAINS, num_domains=2, features={name: torch.as_tensor(values)})


@pytest.mark.parametrize(
    ("method", "feature", "values", "top3", "per_domain_top2"),
    [
        ("big_loss", "loss", [0.5, 2.0, 1.0, 2.0, 0.1, 3.0], [5, 1, 3], [5, 1]),
        ("grad_norm", "grad_norm", [4.0, 0.0, 1.0, 3.0, 3.5, 0.5], [0, 4, 3], [0, 4]),
        ("completion_length", "completion_length", [3, 9, 9, 1, 2, 7], [1, 2, 5], [1, 5]),
        ("least_confidence", "confidence", [0.9, 0.2, 0.5, 0.2, 0.95, 0.6], [1, 3, 2], [1, 3]),
    ],
)
def test_score_ranking_golden(method, feature, values, top3, per_domain_top2):
    sel = get_selector(method).select(_pool(feature, values), 3)
    assert sel.indices.tolist() == top3  # ties broken by lowest index
    assert torch.equal(sel.weights, torch.ones(3))
    sel = get_selector(method, per_domain_budgets=True).select(_pool(feature, values), 2)
    assert sel.indices.tolist() == per_domain_top2  # budgets [1, 1]: best of each domain
    assert sel.info["budgets"] == [1, 1]


def test_middle_ppl_band_around_median():
    ppl = [10.0, 1.0, 5.0, 100.0, 7.0]
    pool = Pool(domains=torch.zeros(5, dtype=torch.long), num_domains=1, features={"perplexity": torch.tensor(ppl)})
    # sorted: 1 (i1), 5 (i2), 7 (i4), 10 (i0), 100 (i3); percentile ranks 0, .25, .5, .75, 1
    assert get_selector("middle_ppl").select(pool, 3).indices.tolist() == [4, 0, 2]
    assert get_selector("middle_ppl", quantile=1.0).select(pool, 1).indices.tolist() == [3]
    # a monotone transform (log perplexity = loss) selects the same band
    pool.features["perplexity"] = torch.tensor([math.log(p) for p in ppl])
    assert get_selector("middle_ppl").select(pool, 3).indices.tolist() == [4, 0, 2]
    with pytest.raises(ValueError, match="quantile"):
        get_selector("middle_ppl", quantile=1.5)


def test_middle_ppl_per_domain_percentiles():
    # domain 1 has 10x larger perplexities; per-domain percentiles still pick each domain's median
    ppl = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    pool = Pool(domains=DOMAINS, num_domains=2, features={"perplexity": ppl})
    assert sorted(get_selector("middle_ppl", per_domain_budgets=True).select(pool, 2).indices.tolist()) == [1, 4]


def test_missing_feature_is_a_clear_error():
    with pytest.raises(KeyError, match="requires"):
        get_selector("big_loss").select(_pool("confidence", [0.1] * 6), 2)
