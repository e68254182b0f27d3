"""CandidateSampler: allocation by domain weights, epoch permutations, determinism, exact resume."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from mixsel.data.sampler import CandidateSampler

# 3 domains of sizes 6, 30, 4, interleaved so that indices do not reveal the domain
DOMAINS = torch.tensor([1, 0, 1, 2] * 4 + [1] * 18 + [0, 0, 1, 1, 1, 1])
SIZES = [6, 30, 4]


def counts(pool: torch.Tensor, num_domains: int = 3) -> list[int]:
    return torch.bincount(DOMAINS[pool], minlength=num_domains).tolist()


def test_domain_sizes_and_pool_shape():
    s = CandidateSampler(DOMAINS, 8, seed=0)
    assert s.domain_sizes.tolist() == SIZES
    pool = s.draw()
    assert pool.shape == (8,)
    assert pool.dtype == torch.long
    assert int(pool.min()) >= 0 and int(pool.max()) < DOMAINS.numel()


def test_same_seed_same_pools_other_seed_differs():
    a, b, c = (CandidateSampler(DOMAINS, 10, seed=s) for s in (3, 3, 4))
    pools_a = [a.draw().tolist() for _ in range(6)]
    assert pools_a == [b.draw().tolist() for _ in range(6)]
    assert pools_a != [c.draw().tolist() for _ in range(6)]


def test_global_rng_is_untouched_and_does_not_matter():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = CandidateSampler(DOMAINS, 10, seed=1).draw()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)
    assert torch.equal(CandidateSampler(DOMAINS, 10, seed=1).draw(), a)


def test_proportional_allocation_is_largest_remainder():
    s = CandidateSampler(DOMAINS, 7, seed=0, allocation="proportional")
    # shares 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4] -> floors [3, 2, 1], one left -> largest remainder (domain 0)
    assert s.allocate(torch.tensor([0.5, 0.3, 0.2])).tolist() == [4, 2, 1]
    # equal remainders go to the lower id: 7 / 3 = 2.33 each -> floors [2, 2, 2], one left -> [3, 2, 2]
    assert s.allocate(torch.tensor([1.0, 1.0, 1.0])).tolist() == [3, 2, 2]
    # natural proportions 7 * [6, 30, 4] / 40 = [1.05, 5.25, 0.7] -> [1, 5, 1]
    assert s.allocate().tolist() == [1, 5, 1]
    assert counts(s.draw(torch.tensor([0.5, 0.3, 0.2]))) == [4, 2, 1]


def test_multinomial_counts_follow_weights_over_many_draws():
    w = torch.tensor([0.2, 0.5, 0.3])
    s = CandidateSampler(DOMAINS, 20, seed=0)
    total = torch.zeros(3)
    draws = 400
    for _ in range(draws):
        total += torch.tensor(counts(s.draw(w)), dtype=torch.float)
    freq = total / (20 * draws)
    # std of each frequency <= sqrt(0.25 / 8000) = 0.0056; 0.02 is more than 3.5 sigma
    assert torch.allclose(freq, w, atol=0.02), freq


def test_natural_proportions_by_default():
    s = CandidateSampler(DOMAINS, 40, seed=0)
    total = torch.zeros(3)
    for _ in range(200):
        total += torch.tensor(counts(s.draw()), dtype=torch.float)
    assert torch.allclose(total / total.sum(), torch.tensor(SIZES) / 40.0, atol=0.02)


@pytest.mark.parametrize("allocation", ["multinomial", "proportional"])
def test_zero_weight_domain_never_appears(allocation):
    s = CandidateSampler(DOMAINS, 12, seed=0, allocation=allocation)
    for _ in range(50):
        assert counts(s.draw(torch.tensor([0.5, 0.0, 0.5])))[1] == 0


def test_each_epoch_visits_every_example_once_without_duplicates_in_a_pool():
    # domain 0 has 6 examples; with weight only on it and pool 4, 3 pools span exactly 2 epochs
    s = CandidateSampler(DOMAINS, 4, seed=5, allocation="proportional", weights=torch.tensor([1.0, 0.0, 0.0]))
    members = set(torch.nonzero(DOMAINS == 0).reshape(-1).tolist())
    pools = [s.draw().tolist() for _ in range(3)]
    seq = [i for p in pools for i in p]
    # pool 2 crosses the epoch boundary; with seed 5 a plain reshuffle would repeat an example in it
    assert all(len(set(p)) == 4 for p in pools)
    assert Counter(seq) == dict.fromkeys(members, 2)  # two full epochs: every example exactly twice
    assert s.epochs == [1, 0, 0]


def test_domain_smaller_than_its_count_wraps_around():
    s = CandidateSampler(DOMAINS, 10, seed=0, allocation="proportional")
    pool = s.draw(torch.tensor([0.0, 0.0, 1.0]))  # domain 2 has only 4 examples
    assert counts(pool) == [0, 0, 10]
    per_example = torch.bincount(pool, minlength=DOMAINS.numel())[DOMAINS == 2]
    assert sorted(per_example.tolist()) == [2, 2, 3, 3]


@pytest.mark.parametrize("allocation", ["multinomial", "proportional"])
def test_exact_resume_after_five_draws(allocation):
    w = torch.tensor([0.2, 0.3, 0.5])
    reference = CandidateSampler(DOMAINS, 9, seed=7, allocation=allocation)
    for _ in range(5):
        reference.draw(w)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    expected = [reference.draw(w).tolist() for _ in range(8)]

    fresh = CandidateSampler(DOMAINS, 9, seed=999, allocation=allocation)  # the seed comes from the state
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.draws == 5
    assert [fresh.draw(w).tolist() for _ in range(8)] == expected


def test_state_dict_is_a_snapshot():
    s = CandidateSampler(DOMAINS, 9, seed=0)
    state = s.state_dict()
    first = s.draw().tolist()
    s.draw()
    s.load_state_dict(state)
    assert s.draw().tolist() == first


def test_load_state_dict_rejects_other_data_or_settings():
    state = CandidateSampler(DOMAINS, 9, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"pool_size=9 but this one has 10"):
        CandidateSampler(DOMAINS, 10, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"cannot resume: the saved sampler has fingerprint"):
        CandidateSampler(DOMAINS.flip(0), 9, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"allocation='multinomial'"):
        CandidateSampler(DOMAINS, 9, seed=0, allocation="proportional").load_state_dict(state)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.tensor([0.5, 0.5]), r"weights has 2 entries but there are 3 domains"),
        (torch.tensor([0.5, -0.1, 0.6]), r"weights must be non-negative"),
        (torch.tensor([0.5, float("nan"), 0.5]), r"weights must be finite"),
        (torch.tensor([0.5, float("inf"), 0.5]), r"weights must be finite"),
        (torch.zeros(3), r"weights are all zero"),
    ],
)
def test_bad_weights(weights, message):
    s = CandidateSampler(DOMAINS, 5, seed=0)
    state = s.state_dict()
    with pytest.raises(ValueError, match=message):
        s.draw(weights)
    with pytest.raises(ValueError, match=message):
        CandidateSampler(DOMAINS, 5, seed=0, weights=weights)
    assert torch.equal(s.state_dict()["generator"], state["generator"])  # a failed draw consumes nothing


def test_constructor_errors_and_empty_domains():
    with pytest.raises(ValueError, match=r"pool_size must be a positive integer"):
        CandidateSampler(DOMAINS, 0, seed=0)
    with pytest.raises(ValueError, match=r"allocation='stratified' is unknown"):
        CandidateSampler(DOMAINS, 4, seed=0, allocation="stratified")
    with pytest.raises(ValueError, match=r"domain_ids is empty"):
        CandidateSampler(torch.zeros(0, dtype=torch.long), 4, seed=0)
    with pytest.raises(ValueError, match=r"num_domains=2 but domain_ids contains the id 2"):
        CandidateSampler(DOMAINS, 4, seed=0, num_domains=2)
    s = CandidateSampler(DOMAINS, 4, seed=0, num_domains=4)  # domain 3 has no train example
    assert s.domain_sizes.tolist() == [*SIZES, 0]
    assert counts(s.draw(), 4)[3] == 0
    with pytest.raises(ValueError, match=r"domain\(s\) \[3\] have no train examples but a positive weight"):
        s.draw(torch.tensor([1.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("mode", ["strided", "contiguous"])
def test_shard_partitions_the_pool(mode):
    pool = torch.arange(10) * 3
    shards = [CandidateSampler.shard(pool, r, 4, mode=mode) for r in range(4)]
    assert sorted(torch.cat(shards).tolist()) == pool.tolist()
    assert [s.numel() for s in shards] == [3, 3, 2, 2]
    if mode == "strided":
        assert shards[1].tolist() == [3, 15, 27]
    else:
        assert shards[1].tolist() == [9, 12, 15]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\)"):
        CandidateSampler.shard(pool, 4, 4, mode=mode)
    with pytest.raises(ValueError, match=r"world_size must be a positive integer"):
        CandidateSampler.shard(pool, 0, 0, mode=mode)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    raw=st.lists(st.integers(0, 5), min_size=5, max_size=5),
    pool_size=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_property_proportional_counts_within_one_of_the_share(sizes, raw, pool_size, seed):
    raw = raw[: len(sizes)]
    hypothesis.assume(sum(raw) > 0)
    domain_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    w = torch.tensor(raw, dtype=torch.float64)
    s = CandidateSampler(domain_ids, pool_size, seed=seed, allocation="proportional")
    pool = s.draw(w)
    got = torch.bincount(domain_ids[pool], minlength=len(sizes))
    share = w / w.sum() * pool_size
    assert pool.numel() == pool_size
    assert ((got - share).abs() < 1 + 1e-9).all()
    assert (got[w == 0] == 0).all()
    for d, size in enumerate(sizes):  # no repeats unless the domain is smaller than its count
        members = pool[domain_ids[pool] == d]
        assert members.unique().numel() == min(size, int(got[d]))
