"""SimulatedBackend: determinism, exact resume, signal consistency, and its known answer."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from envs.rewards import compute_reward
from envs.simulated import SimulatedBackend, SimulatedConfig, largest_remainder_quotas


def run(backend, weights, steps):
    rewards = []
    for _ in range(steps):
        signals = backend.step(weights)
        rewards.append(compute_reward(signals, target_mask_K=backend.target_mask_K).reward)
    return float(np.mean(rewards)), backend.evaluate()["val/mean_ppl"]


def test_same_seed_same_signals_and_different_seed_differs():
    a, b = SimulatedBackend(), SimulatedBackend()
    a.reset(3), b.reset(3)
    w = np.array([0.3, 0.2, 0.2, 0.2, 0.1])
    for _ in range(5):
        sa, sb = a.step(w), b.step(w)
        assert np.array_equal(sa.gram_KK, sb.gram_KK) and np.array_equal(sa.loss_K, sb.loss_K)
    c = SimulatedBackend()
    c.reset(4)
    for _ in range(5):
        sc = c.step(w)
    assert not np.array_equal(sc.gram_KK, sa.gram_KK)


@pytest.mark.parametrize("baseline", ["previous", "initial"])
def test_state_dict_resumes_exactly(baseline):
    w = np.array([0.1, 0.4, 0.2, 0.2, 0.1])
    a = SimulatedBackend(delta_baseline=baseline)
    a.reset(0)
    for _ in range(7):
        a.step(w)
    state = a.state_dict()
    expected = [a.step(w) for _ in range(3)]
    b = SimulatedBackend(delta_baseline=baseline)
    b.load_state_dict(state)
    for e in expected:
        got = b.step(w)
        assert got.step == e.step
        for name in ("loss_K", "gram_KK", "weight_norms_L", "weight_delta_norms_L"):
            assert np.array_equal(getattr(got, name), getattr(e, name)), name


def test_signals_are_consistent():
    backend = SimulatedBackend()
    init = backend.reset(0)
    assert init.step == 0 and np.all(np.isnan(init.loss_K)) and init.weight_norms_L.shape == (4,)
    s = backend.step(np.array([0.5, 0.2, 0.1, 0.1, 0.1]))
    cfg = backend.config
    assert (
        s.microbatches_K.sum() == cfg.microbatches_per_step and s.microbatches_K.min() >= cfg.min_per_domain
    )
    assert np.array_equal(s.tokens_K, s.microbatches_K * cfg.tokens_per_microbatch)
    assert np.allclose(s.gram_KK, s.gram_KK.T) and np.all(np.linalg.eigvalsh(s.gram_KK) > -1e-12)
    assert np.all(s.weight_delta_norms_L > 0) and np.isfinite(s.grad_norm)


def test_absent_domain_has_nan_loss_and_zero_gram_row():
    backend = SimulatedBackend(SimulatedConfig(min_per_domain=0))
    backend.reset(0)
    s = backend.step(np.array([0.5, 0.5, 0.0, 0.0, 0.0]))
    assert np.array_equal(s.microbatches_K, [8, 8, 0, 0, 0])
    assert np.all(np.isnan(s.loss_K[2:])) and np.all(np.isfinite(s.loss_K[:2]))
    assert np.array_equal(s.gram_KK[2:], np.zeros((3, 5))) and np.array_equal(
        s.gram_KK[:, 2:], np.zeros((5, 3))
    )


def test_geometry_junk_opposes_and_hub_aligns_with_every_target():
    backend = SimulatedBackend()
    backend.reset(0)
    cos = backend.cosine_KK
    hub, junk = backend.domain_names.index("wiki"), backend.domain_names.index("junk")
    targets = [i for i in range(5) if i not in (hub, junk)]
    assert np.all(cos[junk, targets] < 0) and cos[junk, hub] < 0
    for i in targets:  # the hub agrees with each target more than any other target does
        others = [j for j in targets if j != i]
        assert cos[hub, i] > cos[i, others].max()


def test_junk_loss_is_highest_and_barely_falls():
    backend = SimulatedBackend()
    backend.reset(0)
    start = backend.expected_loss()
    run(backend, np.full(5, 0.2), 200)
    end = backend.expected_loss()
    junk = backend.domain_names.index("junk")
    assert end[junk] == end.max() and start[junk] == start.max()
    drop = start - end
    assert 0 < drop[junk] < 0.2 * np.delete(drop, junk).min()


def test_known_answer_more_hub_less_junk_is_better_on_reward_and_perplexity():
    """The design target: a good mixer (more weight on the hub, less on junk) wins on both counts."""
    backend = SimulatedBackend()
    names = backend.domain_names
    mixes = {
        "good": np.array([0.15, 0.15, 0.15, 0.5, 0.05]),
        "uniform": np.full(5, 0.2),
        "junk_heavy": np.array([0.1, 0.1, 0.1, 0.1, 0.6]),
    }
    assert names[3] == "wiki" and names[4] == "junk"
    results = {}
    for name, weights in mixes.items():
        backend.reset(0)
        results[name] = run(backend, weights, 200)
    assert results["good"][0] > results["uniform"][0] > results["junk_heavy"][0]  # reward
    assert results["good"][1] < results["uniform"][1] < results["junk_heavy"][1]  # val/mean_ppl


def test_expected_scores_rank_hub_first_and_junk_last():
    backend = SimulatedBackend()
    backend.reset(1)
    scores = np.mean([compute_reward(backend.step(np.full(5, 0.2))).scores_K for _ in range(50)], axis=0)
    assert np.argmax(scores) == backend.domain_names.index("wiki")
    assert np.argmin(scores) == backend.domain_names.index("junk")


def test_largest_remainder_quotas():
    assert largest_remainder_quotas(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    assert largest_remainder_quotas(np.array([1, 1, 1.0]), 4).tolist() == [2, 1, 1]
    assert largest_remainder_quotas(np.array([1.0, 0, 0]), 5, minimum=1).tolist() == [3, 1, 1]


def test_bad_config_and_weights_are_clear_errors():
    with pytest.raises(ValidationError, match="grad_dim"):
        SimulatedConfig(grad_dim=3)
    with pytest.raises(ValidationError, match="min_per_domain"):
        SimulatedConfig(min_per_domain=4, microbatches_per_step=8)
    backend = SimulatedBackend()
    with pytest.raises(RuntimeError, match="reset"):
        backend.step(np.full(5, 0.2))
    backend.reset(0)
    with pytest.raises(ValueError, match="weights_K"):
        backend.step(np.array([1.0, -1, 0, 0, 1]))
