"""ODM bandits: EXP3 and smoothed mean, against hand-computed 2-domain steps and their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium import spaces

from agents import AgentConfig, Exp3Mixer, SmoothedMeanMixer, build_mixer
from agents.base import Transition, exploration_epsilon

OBS = np.zeros(3, np.float32)


def _bandit(kind: str, k: int = 2, floor: float = 0.0, natural: np.ndarray | None = None, **cfg: object):
    return build_mixer(
        AgentConfig(kind=kind, **cfg),
        spaces.Box(-1.0, 1.0, (3,), np.float32),
        spaces.Box(0.0, 1.0, (k,), np.float64),
        seed=0,
        domain_names=[f"d{i}" for i in range(k)],
        natural_weights=natural,
        total_steps=100,
        floor=floor,
    )


def _feed(mixer, loss_K) -> np.ndarray:
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, {"loss_K": np.asarray(loss_K, dtype=np.float64)}))
    return mixer.act(OBS)


def test_epsilon_schedule() -> None:
    assert exploration_epsilon(2, 1) == 0.5  # sqrt(ln 2 / 2) = 0.589 > 1/2
    assert exploration_epsilon(2, 2) == pytest.approx(math.sqrt(math.log(2) / 4))
    assert exploration_epsilon(22, 68) == pytest.approx(1 / 22)  # B16: uniform up to t ~ K ln K
    assert exploration_epsilon(22, 69) < 1 / 22


def test_exp3_hand_computed_two_domain_steps() -> None:
    mixer = _bandit("exp3", exp3_reward_scale=0.1)
    assert isinstance(mixer, Exp3Mixer)
    # t=1: r = [0.2, 0.1]; G = r / 0.5 = [0.4, 0.2]; eps_1 = 1/2, so 1 - K eps = 0: uniform.
    np.testing.assert_allclose(_feed(mixer, [2.0, 1.0]), [0.5, 0.5])
    # t=2: G = [0.8, 0.4]; p = (1 - 2 eps_2) softmax(eps_1 G) + eps_2 with eps_1 = 0.5.
    eps2 = math.sqrt(math.log(2) / 4)
    p0 = (1 - 2 * eps2) / (1 + math.exp(-0.5 * (0.8 - 0.4))) + eps2
    np.testing.assert_allclose(_feed(mixer, [2.0, 1.0]), [p0, 1 - p0], rtol=1e-12)
    # t=3 (importance weighting by the non-uniform p): G += r / p.
    g0, g1 = 0.8 + 0.1 * 3.0 / p0, 0.4 + 0.1 * 0.5 / (1 - p0)
    eps3 = math.sqrt(math.log(2) / 6)
    q0 = (1 - 2 * eps3) / (1 + math.exp(-eps2 * (g0 - g1))) + eps3
    np.testing.assert_allclose(_feed(mixer, [3.0, 0.5]), [q0, 1 - q0], rtol=1e-12)
    assert mixer.update() == {"agent/epsilon": pytest.approx(eps3), "agent/num_updates": 3.0}


def test_smoothed_mean_hand_computed_two_domain_steps() -> None:
    mixer = _bandit("smoothed_mean", smoothing=0.5)
    assert isinstance(mixer, SmoothedMeanMixer)
    np.testing.assert_allclose(_feed(mixer, [2.0, 1.0]), [0.5, 0.5])  # eps_1 = 1/2: uniform
    # R = 0.5 (0.5 e^L1) + 0.5 e^L2 per domain; p = (1 - 2 eps_2) R / sum R + eps_2 (linear, not softmax).
    r0 = 0.25 * math.exp(2.0) + 0.5 * math.exp(1.0)
    r1 = 0.25 * math.exp(1.0) + 0.5 * math.exp(3.0)
    eps2 = math.sqrt(math.log(2) / 4)
    p0 = (1 - 2 * eps2) * r0 / (r0 + r1) + eps2
    np.testing.assert_allclose(_feed(mixer, [1.0, 3.0]), [p0, 1 - p0], rtol=1e-12)


def test_absent_domains_are_not_updated() -> None:
    mixer = _bandit("smoothed_mean", k=3, smoothing=0.5)
    _feed(mixer, [1.0, 2.0, 3.0])
    before = mixer.stat_K.copy()
    _feed(mixer, [np.nan, 2.5, 3.5])
    assert mixer.stat_K[0] == before[0]
    assert mixer.stat_K[1] != before[1]
    num_updates = mixer.num_updates
    _feed(mixer, [np.nan, np.nan, np.nan])  # nothing measured: no update at all
    assert mixer.num_updates == num_updates


@pytest.mark.parametrize("kind", ["exp3", "smoothed_mean"])
def test_weights_sum_to_one_and_respect_eps_and_floor(kind: str) -> None:
    rng = np.random.default_rng(0)
    mixer = _bandit(kind, k=5)
    floored = _bandit(kind, k=5, floor=0.03)
    for t in range(1, 300):
        loss_K = rng.uniform(1.0, 8.0, size=5) * np.array([1, 1, 1, 1, 2])
        weights_K, floored_K = _feed(mixer, loss_K), _feed(floored, loss_K)
        assert abs(weights_K.sum() - 1.0) < 1e-12 and abs(floored_K.sum() - 1.0) < 1e-12
        assert weights_K.min() >= exploration_epsilon(5, t) - 1e-12
        assert floored_K.min() >= 0.03 - 1e-12
    # Both favour the domain with the highest loss.
    assert weights_K.argmax() == 4


@pytest.mark.parametrize("kind", ["exp3", "smoothed_mean"])
def test_equal_rewards_keep_uniform_weights(kind: str) -> None:
    mixer = _bandit(kind, k=4)
    for _ in range(100):
        np.testing.assert_allclose(_feed(mixer, [3.0, 3.0, 3.0, 3.0]), np.full(4, 0.25), rtol=1e-12)


def test_exp3_stays_finite_when_estimates_grow_large() -> None:
    mixer = _bandit("exp3", k=3, exp3_reward_scale=1.0)
    for _ in range(2000):
        weights_K = _feed(mixer, [500.0, 1.0, 1.0])  # plain exp(eps * G) would overflow
    assert np.all(np.isfinite(weights_K)) and weights_K.argmax() == 0


def test_bandits_start_from_the_natural_weights() -> None:
    natural_K = np.array([1.0, 3.0])
    np.testing.assert_allclose(_bandit("smoothed_mean", natural=natural_K).act(OBS), [0.25, 0.75])


@pytest.mark.parametrize("kind", ["exp3", "smoothed_mean"])
def test_state_dict_round_trip(kind: str) -> None:
    rng = np.random.default_rng(1)
    a = _bandit(kind, k=3)
    for _ in range(20):
        _feed(a, rng.uniform(1, 4, size=3))
    b = _bandit(kind, k=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        loss_K = rng.uniform(1, 4, size=3)
        np.testing.assert_array_equal(_feed(a, loss_K), _feed(b, loss_K))
    with pytest.raises(ValueError, match="state is for"):
        _bandit(kind, k=4).load_state_dict(a.state_dict())


def test_missing_loss_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs transition.loss_K"):
        _bandit("exp3").observe(Transition.from_step(OBS, np.array([0.5, 0.5]), 0.0, OBS, {}))
