import pytest
import torch

from mixsel import get_selector
from mixsel.selection import Pool

# two anchors; mean scores s = [3, 2.95, 2.5]; examples 0 and 1 are nearly collinear (K01 = .9)
VAL_SCORES = torch.tensor([[4.0, 2.0], [3.9, 2.0], [2.5, 2.5]], dtype=torch.float64)
GRAM = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _pool(lr, domains=(0, 0, 0)):
    d = torch.tensor(domains)
    return Pool(domains=d, num_domains=int(d.max()) + 1, features={"gram": GRAM, "val_scores": VAL_SCORES}, lr=lr)


def test_interaction_term_hand_computed():
    sel = get_selector("greats").select(_pool(lr=1.0), 2)
    # pick 0 (score 3); then 2.95 - 1^2 * .9 = 2.05 < 2.5: the redundant example 1 is penalised
    assert sel.indices.tolist() == [0, 2]
    torch.testing.assert_close(sel.gains, torch.tensor([3.0, 2.5], dtype=torch.float64))
    # with a small learning rate the penalty is O(lr) relative: .295 - .01 * .9 = .286 > .25
    assert get_selector("greats").select(_pool(lr=0.1), 2).indices.tolist() == [0, 1]
    # first-order only: plain top-k of the scores
    assert get_selector("greats", second_order=False).select(_pool(lr=1.0), 2).indices.tolist() == [0, 1]
    # an explicit lr overrides the pool's
    assert get_selector("greats", lr=0.1).select(_pool(lr=1.0), 2).indices.tolist() == [0, 1]


def test_budgets_and_determinism():
    sel = get_selector("greats", per_domain_budgets=True, budget="fixed", shares=[1, 1]).select(
        _pool(lr=0.1, domains=(0, 0, 1)), 2
    )
    assert sel.indices.tolist() == [0, 2]
    assert sel.info["budgets"] == [1, 1]
    a = get_selector("greats").select(_pool(lr=1.0), 3)
    b = get_selector("greats").select(_pool(lr=1.0), 3)
    assert torch.equal(a.indices, b.indices) and sorted(a.indices.tolist()) == [0, 1, 2]


def test_zero_lr_is_clamped():
    assert get_selector("greats").select(_pool(lr=0.0), 2).indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="lr"):
        get_selector("greats", lr=-1.0)
