import torch

from mixsel import get_selector
from mixsel.selection import Pool
from mixsel.selection.hidden_fl import cosine_similarity_matrix

# two directions: rows 0, 1, 4 point along x, rows 2, 3 along y
HIDDEN = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0], [1.0, 0.05]])


def test_cosine_similarity():
    s = cosine_similarity_matrix(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
    torch.testing.assert_close(torch.diagonal(s), torch.ones(3))
    torch.testing.assert_close(s[0, 1], torch.tensor(0.0))
    torch.testing.assert_close(s[0, 2], torch.tensor(2**-0.5))


def test_one_pick_per_direction():
    pool = Pool(domains=torch.zeros(5, dtype=torch.long), num_domains=1, features={"hidden": HIDDEN})
    sel = get_selector("hidden_fl").select(pool, 2)
    picked = sel.indices.tolist()
    assert len({0 if i in (0, 1, 4) else 1 for i in picked}) == 2
    # natural weights: the medoids' cluster sizes (applied only with selection.use_weights=true)
    assert sorted(sel.weights.tolist()) == [2.0, 3.0]
    assert get_selector("hidden_fl").weighted_loss is False


def test_per_domain_budgets():
    # all x-direction rows in domain 0; budgets for k=2 with counts [3, 2] are [1, 1]
    domains = torch.tensor([0, 0, 1, 1, 0])
    pool = Pool(domains=domains, num_domains=2, features={"hidden": HIDDEN})
    sel = get_selector("hidden_fl", per_domain_budgets=True).select(pool, 2)
    assert torch.bincount(domains[sel.indices], minlength=2).tolist() == [1, 1]
