"""DomainSampler: exact quotas, rank-disjoint epoch-aware reads, determinism and exact resume."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from envs.sampler import (
    DomainSampler,
    MicroBatch,
    StepPlan,
    epoch_permutation,
    largest_remainder_quotas,
    quota_targets,
    systematic_quotas,
)

ROUNDINGS = ("largest_remainder", "systematic")


def make(num_sequences_K=(500, 300, 200), **kw) -> DomainSampler:
    kw.setdefault("micro_batch_size", 4)
    kw.setdefault("grad_accum", 3)
    kw.setdefault("seed", 7)
    return DomainSampler(list(num_sequences_K), **kw)


def hamilton_oracle(ints: list[int], total: int, tie_offset: int) -> list[int]:
    """Largest remainder in exact rational arithmetic: floors, then seats by (remainder desc, rotated index)."""
    s, k = sum(ints), len(ints)
    targets = [Fraction(a * total, s) for a in ints]
    floors = [t.numerator // t.denominator for t in targets]
    order = sorted(range(k), key=lambda i: (-(targets[i] - floors[i]), (i - tie_offset) % k))
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


def global_stream(samplers: list[DomainSampler], weights_seq) -> tuple[list[StepPlan], dict[int, list[int]]]:
    """Run W rank-samplers in lockstep; return rank 0's plans and every domain's reads in global order."""
    world = len(samplers)
    reads: dict[int, list[int]] = {d: [] for d in range(samplers[0].num_domains)}
    plans0 = []
    for w_K in weights_seq:
        plans = [s.plan_step(w_K) for s in samplers]
        for p in plans[1:]:  # every rank sees the same global plan
            assert np.array_equal(p.domains, plans[0].domains)
            assert np.array_equal(p.quotas_K, plans[0].quotas_K)
        for j, d in enumerate(plans[0].domains.tolist()):
            mb = plans[j % world].local[j // world]
            assert mb.domain == d  # rank r's i-th micro-batch is global entry r + i*W
            reads[d].extend(mb.sequence_indices.tolist())
        plans0.append(plans[0])
    return plans0, reads


# ------------------------------------------------------------------------------------------------ quotas
@pytest.mark.parametrize("seed", range(20))
def test_largest_remainder_matches_exact_rational_oracle(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        k = int(rng.integers(2, 12))
        ints = rng.integers(0, 6, size=k).tolist()
        ints[int(rng.integers(k))] += 1  # positive sum
        total, offset = int(rng.integers(0, 60)), int(rng.integers(0, 30))
        got = largest_remainder_quotas(np.array(ints, dtype=float), total, tie_offset=offset)
        assert got.tolist() == hamilton_oracle(ints, total, offset), (ints, total, offset)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quotas_within_one_of_target_for_extreme_weights(rounding):
    weights_K = np.array([0.498, 0.498, 0.004])
    for grad_accum in range(1, 50):
        for world_size in (1, 2, 3, 8):
            sampler = make(grad_accum=grad_accum, world_size=world_size, rounding=rounding)
            for _ in range(3):
                quotas_K = sampler.plan_step(weights_K).quotas_K
                m = world_size * grad_accum
                assert quotas_K.sum() == m
                assert np.all(np.abs(quotas_K - weights_K * m) < 1.0), (quotas_K, m)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quotas_within_one_of_target_for_22_dirichlet_domains(rounding):
    for seed in range(100):
        rng = np.random.default_rng(seed)
        weights_K = rng.dirichlet(np.full(22, rng.choice([0.05, 0.3, 1.0, 5.0])))
        for m in (1, 8, 21, 22, 23, 144, 1000):
            quotas_K = (
                largest_remainder_quotas(weights_K, m, tie_offset=seed)
                if rounding == "largest_remainder"
                else systematic_quotas(weights_K, m, u=float(rng.random()))
            )
            assert quotas_K.dtype == np.int64 and quotas_K.sum() == m and quotas_K.min() >= 0
            assert np.all(np.abs(quotas_K - weights_K * m) < 1.0), (seed, m)


def test_zero_weight_domain_gets_nothing_without_a_minimum():
    for rounding in ROUNDINGS:
        sampler = make((50, 50, 50, 50), grad_accum=7, rounding=rounding)
        for _ in range(30):
            assert sampler.plan_step([0.5, 0.0, 0.3, 0.2]).quotas_K[1] == 0


def test_exact_uniform_ties_rotate_so_every_domain_is_served():
    # K=6 domains, 4 micro-batches a step: fixed index tie-breaking would starve domains 4 and 5 forever.
    sampler = make([100] * 6, grad_accum=2, world_size=2)
    counts_K = sum(sampler.plan_step(np.full(6, 1 / 6)).quotas_K for _ in range(6))
    assert counts_K.tolist() == [4] * 6


def test_systematic_rounding_is_unbiased_where_largest_remainder_starves():
    weights_K = np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])  # targets 0.8 x4 and 0.4 x2 with 4 micro-batches
    steps = 3000
    lr = make([100] * 6, grad_accum=4, rounding="largest_remainder")
    sy = make([100] * 6, grad_accum=4, rounding="systematic")
    lr_K = sum(lr.plan_step(weights_K).quotas_K for _ in range(steps))
    sy_K = sum(sy.plan_step(weights_K).quotas_K for _ in range(steps))
    assert lr_K[4] == lr_K[5] == 0  # the documented bias of deterministic rounding
    # systematic: per-step quotas are 0/1 with mean w*4; the mean over 3000 steps has std <= 0.01
    np.testing.assert_allclose(sy_K / steps, weights_K * 4, atol=0.05)


def test_min_per_domain_is_honoured_and_the_rest_follows_the_weights():
    rng = np.random.default_rng(0)
    for rounding in ROUNDINGS:
        sampler = make([40] * 22, grad_accum=18, world_size=8, min_per_domain=1, rounding=rounding)
        for _ in range(50):
            weights_K = rng.dirichlet(np.full(22, 0.2))
            weights_K[rng.integers(22)] = 0.0
            plan = sampler.plan_step(weights_K)
            assert plan.quotas_K.min() >= 1 and plan.quotas_K.sum() == 144
            target_K = quota_targets(plan.weights_K, 144, 1)
            assert np.all(np.abs(plan.quotas_K - target_K) < 1.0)
    # the reference's case (0.498, 0.498, 0.004) with a forced minimum of 2 out of 8
    np.testing.assert_array_equal(largest_remainder_quotas([0.498, 0.498, 0.004], 8, 2), [3, 3, 2])


def test_quota_targets_water_fill_the_minimum():
    # 0.05 * 20 = 1 < 2: pinned to 2; the other two share 18 in proportion 3:1
    np.testing.assert_allclose(quota_targets(np.array([0.7125, 0.2375, 0.05]), 20, 2), [13.5, 4.5, 2.0])


def test_min_per_domain_larger_than_the_step_is_rejected():
    with pytest.raises(ValueError, match=r"min_per_domain=2 x K=3 domains = 6 exceeds the 4 micro-batches"):
        make(grad_accum=2, world_size=2, min_per_domain=2)
    with pytest.raises(ValueError, match=r"min_per_domain=1 x K=3 domains = 3 exceeds the 2 micro-batches"):
        largest_remainder_quotas([1, 1, 1], 2, 1)


@pytest.mark.parametrize("floor", [0.0, 0.01, 0.1, 0.3])
def test_weight_floor_is_honoured(floor):
    sampler = make(grad_accum=20, weight_floor=floor)
    for weights_K in ([1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.2, 0.5, 0.3]):
        plan = sampler.plan_step(weights_K)
        assert plan.weights_K.min() >= floor - 1e-12
        assert plan.weights_K.sum() == pytest.approx(1.0)
        assert np.all(np.abs(plan.quotas_K - plan.weights_K * 20) < 1.0)
    assert make(weight_floor=0.0).plan_step([2.0, 1.0, 1.0]).weights_K.tolist() == [0.5, 0.25, 0.25]
    assert make(weight_floor=0.1).plan_step([1.0, 0.0, 0.0]).weights_K.tolist() == pytest.approx(
        [0.8, 0.1, 0.1]
    )


def test_weight_floor_must_be_below_one_over_k():
    with pytest.raises(ValueError, match=r"weight_floor=0.34 must be in \[0, 1/K\)"):
        make(weight_floor=0.34)


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, float("nan"), 0.5], r"finite; domain 1 has nan"),
        ([0.5, 0.5, float("inf")], r"finite; domain 2 has inf"),
        ([0.5, -0.1, 0.6], r">= 0; domain 1 has -0.1"),
        ([0.0, 0.0, 0.0], r"positive finite sum; got sum 0.0"),
        ([0.5, 0.5], r"length K=3 .*got shape \(2,\)"),
        ([0.2, 0.2, 0.2, 0.4], r"length K=3 .*got shape \(4,\)"),
        ([[0.2, 0.3, 0.5]], r"length K=3 .*got shape \(1, 3\)"),
        (["a", "b", "c"], r"sequence of 3 numbers"),
    ],
)
def test_bad_weights_are_rejected_with_the_value(weights, match):
    sampler = make(domain_names=None)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=match):
        sampler.plan_step(weights)
    assert sampler.state_dict() == before  # a rejected step consumes nothing


def test_bad_weights_message_names_the_domain():
    sampler = make(domain_names=["code", "junk", "prose"])
    with pytest.raises(ValueError, match=r"domain 'junk' has -1.0"):
        sampler.plan_step([1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_sequences_K": [10, 0, 5]}, r"at least one training sequence; domain 1 has 0"),
        ({"num_sequences_K": []}, r"non-empty 1-D list of integers"),
        ({"num_sequences_K": [1.5, 2.0]}, r"non-empty 1-D list of integers"),
        ({"micro_batch_size": 0}, r"micro_batch_size must be an integer >= 1; got 0"),
        ({"grad_accum": 2.0}, r"grad_accum must be an integer >= 1; got 2.0"),
        ({"world_size": 2, "rank": 2}, r"rank must be in \[0, world_size=2\); got 2"),
        ({"seed": -1}, r"seed must be an integer >= 0; got -1"),
        ({"rounding": "nearest"}, r"rounding must be one of .*'nearest'"),
        ({"domain_names": ["a", "b"]}, r"domain_names has 2 names for K=3"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


# ------------------------------------------------------------------------------------------------ reads
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_no_sequence_is_read_twice_within_an_epoch_across_ranks(rounding):
    num_sequences_K = [997, 131, 29, 5]  # the small domains wrap many times
    world, ga, mbs, steps = 4, 3, 4, 60
    samplers = [
        make(
            num_sequences_K, micro_batch_size=mbs, grad_accum=ga, world_size=world, rank=r, rounding=rounding
        )
        for r in range(world)
    ]
    rng = np.random.default_rng(1)
    plans, reads = global_stream(samplers, [rng.dirichlet(np.ones(4)) for _ in range(steps)])
    for d, n in enumerate(num_sequences_K):
        total = int(sum(p.quotas_K[d] for p in plans)) * mbs
        assert len(reads[d]) == total
        counts = np.bincount(reads[d], minlength=n)
        full, part = divmod(total, n)
        # every complete epoch reads each sequence once; the current epoch reads `part` distinct ones
        assert counts.min() >= full and counts.max() <= full + 1 and int((counts == full + 1).sum()) == part
        for e in range(full):  # and each epoch is exactly one permutation
            assert sorted(reads[d][e * n : (e + 1) * n]) == list(range(n))
    assert samplers[0].epochs_K.tolist() == [len(reads[d]) // n for d, n in enumerate(num_sequences_K)]
    np.testing.assert_allclose(
        samplers[0].epoch_progress_K, [len(reads[d]) / n for d, n in enumerate(num_sequences_K)]
    )


def test_epoch_order_depends_only_on_seed_domain_and_epoch():
    num_sequences_K = [13, 11]
    for weights_seq in ([[0.5, 0.5]] * 40, [[0.9, 0.1]] * 20 + [[0.1, 0.9]] * 20):
        samplers = [
            make(num_sequences_K, micro_batch_size=3, grad_accum=2, world_size=2, rank=r) for r in range(2)
        ]
        _, reads = global_stream(samplers, weights_seq)
        for d, n in enumerate(num_sequences_K):
            epochs = len(reads[d]) // n
            assert epochs >= 2
            expected = np.concatenate([epoch_permutation(7, d, e, n) for e in range(epochs + 1)])
            assert reads[d] == expected[: len(reads[d])].tolist()
    # each epoch reshuffles, and other seeds or domains give other orders
    assert not np.array_equal(epoch_permutation(7, 0, 0, 50), epoch_permutation(7, 0, 1, 50))
    assert not np.array_equal(epoch_permutation(7, 0, 0, 50), epoch_permutation(8, 0, 0, 50))
    assert not np.array_equal(epoch_permutation(7, 0, 0, 50), epoch_permutation(7, 1, 0, 50))


def test_domains_interleave_and_match_the_quotas():
    plan = make(grad_accum=30, seed=3).plan_step([0.5, 0.3, 0.2])
    np.testing.assert_array_equal(np.bincount(plan.domains, minlength=3), plan.quotas_K)
    assert not np.array_equal(plan.domains, np.sort(plan.domains))  # shuffled, not grouped by domain
    assert all(isinstance(mb, MicroBatch) and mb.sequence_indices.dtype == np.int64 for mb in plan.local)
    assert all(mb.sequence_indices.shape == (4,) for mb in plan.local) and len(plan.local) == 30


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_plans_and_other_seed_other_order():
    rng = np.random.default_rng(0)
    weights_seq = [rng.dirichlet(np.ones(3)) for _ in range(20)]
    a, b, c = make(seed=11), make(seed=11), make(seed=12)
    plans_a = [a.plan_step(w) for w in weights_seq]
    assert plans_a == [b.plan_step(w) for w in weights_seq]
    plans_c = [c.plan_step(w) for w in weights_seq]
    assert [p.quotas_K.tolist() for p in plans_c] == [
        p.quotas_K.tolist() for p in plans_a
    ]  # quotas: weights only
    assert any(not np.array_equal(p.domains, q.domains) for p, q in zip(plans_a, plans_c, strict=True))
    assert plans_a != plans_c


def test_quotas_preview_matches_the_next_plan_and_advances_nothing():
    for rounding in ROUNDINGS:
        sampler = make(grad_accum=5, rounding=rounding)
        sampler.plan_step([0.3, 0.3, 0.4])
        before = sampler.state_dict()
        w_K, q_K = sampler.quotas([0.1, 0.6, 0.3])
        assert sampler.state_dict() == before
        plan = sampler.plan_step([0.1, 0.6, 0.3])
        np.testing.assert_array_equal(plan.quotas_K, q_K)
        np.testing.assert_array_equal(plan.weights_K, w_K)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("changing_weights", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rounding": "systematic", "min_per_domain": 1, "weight_floor": 0.02, "grad_accum": 6},
        {"world_size": 4, "rank": 3, "grad_accum": 2},
    ],
)
def test_resume_reproduces_the_next_50_steps(changing_weights, kwargs):
    num_sequences_K = [230, 57, 19, 7]
    rng = np.random.default_rng(5)
    fixed = rng.dirichlet(np.ones(4))
    weights_seq = [rng.dirichlet(np.ones(4) * 0.5) if changing_weights else fixed for _ in range(80)]
    t = 30
    uninterrupted = make(num_sequences_K, **kwargs)
    for w in weights_seq[:t]:
        uninterrupted.plan_step(w)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # JSON-able plain types
    expected = [uninterrupted.plan_step(w) for w in weights_seq[t:]]

    restored = make(num_sequences_K, **kwargs)
    restored.load_state_dict(state)
    assert restored.step == t
    got = [restored.plan_step(w) for w in weights_seq[t:]]
    assert got == expected
    assert restored.state_dict() == uninterrupted.state_dict()


def test_state_from_rank_zero_restores_another_rank():
    rank0, rank2 = make(world_size=3, rank=0), make(world_size=3, rank=2)
    for _ in range(7):
        rank0.plan_step([0.2, 0.3, 0.5])
        rank2.plan_step([0.2, 0.3, 0.5])
    assert rank0.state_dict() == rank2.state_dict()  # the state is global
    fresh = make(world_size=3, rank=2)
    fresh.load_state_dict(rank0.state_dict())
    assert fresh.plan_step([0.6, 0.2, 0.2]) == rank2.plan_step([0.6, 0.2, 0.2])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.update(seed=8), r"saved with seed 8, this sampler has seed 7"),
        (lambda s: s.update(num_sequences_K=[500, 300, 201]), r"the prepared data changed"),
        (lambda s: s.pop("positions_K"), r"lacks \['positions_K'\]"),
        (lambda s: s.update(positions_K=[1, 2]), r"'positions_K' must be 3 integers >= 0"),
        (lambda s: s.update(positions_K=[1, -2, 3]), r"'positions_K' must be 3 integers >= 0"),
        (lambda s: s.update(step=-1), r"'step' must be an integer >= 0; got -1"),
        (lambda s: s.update(version=99), r"version 99 is not 1"),
    ],
)
def test_bad_state_is_rejected(mutate, match):
    sampler = make()
    sampler.plan_step([1, 1, 1])
    state = sampler.state_dict()
    mutate(state)
    fresh = make()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.step == 0


def test_resume_with_another_world_size_continues_the_same_global_stream():
    # the state is global stream positions, so 2 ranks x grad_accum 2 can resume as 1 rank x grad_accum 4
    two = [make(world_size=2, rank=r, grad_accum=2) for r in range(2)]
    weights = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]
    for w in weights[:2]:
        for s in two:
            s.plan_step(w)
    one = make(world_size=1, rank=0, grad_accum=4)
    one.load_state_dict(two[0].state_dict())
    plan_one = one.plan_step(weights[2])
    plans_two = [s.plan_step(weights[2]) for s in two]
    np.testing.assert_array_equal(plan_one.domains, plans_two[0].domains)
    interleaved = [plans_two[j % 2].local[j // 2] for j in range(4)]
    assert list(plan_one.local) == interleaved
