import torch

from mixsel.metrics import conflicting_pairs, gradient_mismatch


def test_conflicting_pairs_hand_counted():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    gram = g @ g.T
    # pairs with negative inner product: (0,1): -1; (1,3): -0.9 ; (1,2): 0.1 no; others >= 0
    assert conflicting_pairs(gram) == 2
    assert conflicting_pairs(gram, torch.tensor([0, 2, 3])) == 0


def test_gradient_mismatch():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gram = g @ g.T
    # selecting everything matches the pool mean exactly
    assert abs(gradient_mismatch(gram, torch.tensor([0, 1, 2]))) < 1e-12
    # selecting row 2 alone: mean (2/3, 2/3) vs (1, 1): err = 2*(1/3)^2 = 2/9, ref = 8/9 -> 0.25
    assert abs(gradient_mismatch(gram, torch.tensor([2])) - 0.25) < 1e-12
