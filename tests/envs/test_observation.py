"""The observation: layout, z-scoring, missing-value rule, modes and bounds."""

from __future__ import annotations

import numpy as np
import pytest

from envs.observation import ObservationState, build_observation, observation_bounds, observation_size
from envs.rewards import zscore
from envs.signals import TrainSignals

K, L, CLAMP = 4, 3, 3.0


def sig(step, loss, counts=(2, 1, 1, 0), norms=(1.0, 2.0, 4.0), deltas=(0.1, 0.2, 0.1)):
    return TrainSignals(
        step=step,
        weights_K=np.full(K, 1 / K),
        loss_K=np.asarray(loss, dtype=float),
        microbatches_K=np.asarray(counts),
        tokens_K=np.asarray(counts) * 8,
        loss=1.0,
        lr=1e-3,
        grad_norm=1.0,
        weight_norms_L=None if norms is None else np.asarray(norms, dtype=float),
        weight_delta_norms_L=None if deltas is None else np.asarray(deltas, dtype=float),
    )


def build(s, state, mode="default", total=10):
    return build_observation(s, state, num_layers=L, total_steps=total, clamp=CLAMP, mode=mode)


def test_layout_and_values_match_the_definition():
    assert observation_size(K, L) == 3 * K + 2 * L + 1
    s1 = sig(1, [5.0, 4.0, 6.0, 3.0], counts=(2, 1, 1, 1))
    obs1, _, state = build(s1, ObservationState())
    s2 = sig(2, [4.0, 3.5, 6.5, 2.0], counts=(1, 2, 1, 1))
    obs2, raw, _ = build(s2, state)
    assert obs2.dtype == np.float32 and obs2.shape == (observation_size(K, L),)
    np.testing.assert_allclose(obs2[:K], zscore(s2.loss_K, CLAMP), rtol=1e-6)
    np.testing.assert_allclose(raw["loss_change_K"], s2.loss_K - s1.loss_K)  # step-to-step (fixes B8)
    np.testing.assert_allclose(obs2[K : 2 * K], zscore(s2.loss_K - s1.loss_K, CLAMP), rtol=1e-6)
    np.testing.assert_allclose(obs2[2 * K : 3 * K], zscore(np.array([1.0, 2, 1, 1]), CLAMP), rtol=1e-6)
    np.testing.assert_allclose(obs2[3 * K : 3 * K + L], zscore(np.array([1.0, 2, 4]), CLAMP), rtol=1e-6)
    np.testing.assert_allclose(
        obs2[3 * K + L : 3 * K + 2 * L], zscore(np.array([0.1, 0.2, 0.1]), CLAMP), rtol=1e-6
    )
    assert obs2[-1] == pytest.approx(0.2)
    assert np.array_equal(obs1[K : 2 * K], np.zeros(K))  # no change at the first step


def test_reference_mode_uses_change_since_first_step_and_progress_to_100():
    state = ObservationState()
    losses = [[5.0, 4.0, 6.0, 3.0], [4.0, 3.5, 6.5, 2.0], [3.0, 3.4, 6.0, 1.0]]
    for step, loss in enumerate(losses, start=1):
        obs, raw, state = build(sig(step, loss, counts=(1, 1, 1, 1)), state, mode="reference")
    np.testing.assert_allclose(raw["loss_change_K"], np.subtract(losses[2], losses[0]))
    assert obs[-1] == pytest.approx(30.0)
    low, high = observation_bounds(K, L, clamp=CLAMP, mode="reference")
    assert high[-1] == 100.0 and low[-1] == 0.0


def test_absent_domain_carries_its_previous_loss():
    _, _, state = build(sig(1, [5.0, 4.0, 6.0, 3.0], counts=(1, 1, 1, 1)), ObservationState())
    obs, raw, state = build(sig(2, [4.0, 3.0, np.nan, 2.0], counts=(2, 1, 0, 1)), state)
    assert np.all(np.isfinite(obs))
    assert raw["loss_K"][2] == 6.0 and raw["loss_change_K"][2] == 0.0
    # Still absent at the next step: still carried.
    _, raw, _ = build(sig(3, [3.0, 2.0, np.nan, 1.0]), state)
    assert raw["loss_K"][2] == 6.0


def test_never_seen_domain_takes_the_mean_and_reset_record_is_neutral():
    k_nan = np.full(K, np.nan)
    obs0, raw0, state = build(sig(0, k_nan, counts=(0, 0, 0, 0), deltas=(0, 0, 0)), ObservationState())
    assert np.all(np.isfinite(obs0)) and np.array_equal(obs0[: 3 * K], np.zeros(3 * K))
    assert state.last_loss_K is None  # the reset record measured nothing
    obs1, raw1, _ = build(sig(1, [5.0, np.nan, 3.0, 4.0], counts=(1, 0, 1, 2)), state)
    assert raw1["loss_K"][1] == pytest.approx(4.0)
    assert obs1[1] == pytest.approx(0.0, abs=1e-6)


def test_missing_or_nonfinite_weight_norms_are_carried_or_zero():
    obs, raw, state = build(sig(1, [1.0, 2, 3, 4], norms=None, deltas=None), ObservationState())
    assert np.array_equal(raw["weight_norms_L"], np.zeros(L)) and np.all(np.isfinite(obs))
    _, _, state = build(sig(2, [1.0, 2, 3, 4]), state)
    _, raw, _ = build(sig(3, [1.0, 2, 3, 4], norms=(np.inf, 3.0, np.nan)), state)
    np.testing.assert_allclose(raw["weight_norms_L"], [1.0, 3.0, 4.0])


def test_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="weight_norms_L"):
        build(sig(1, [1.0, 2, 3, 4], norms=(1.0, 2.0)), ObservationState())
    with pytest.raises(ValueError, match="total_steps"):
        build_observation(sig(1, [1.0] * K), ObservationState(), num_layers=L, total_steps=0)


def test_observation_stays_in_bounds_under_extreme_inputs():
    low, high = observation_bounds(K, L, clamp=CLAMP)
    state = ObservationState()
    rng = np.random.default_rng(0)
    for step in range(1, 60):
        loss = rng.lognormal(0, 5, size=K)
        loss[rng.random(K) < 0.3] = np.nan
        norms = rng.lognormal(0, 5, size=L)
        obs, _, state = build(sig(step, loss, counts=rng.integers(0, 50, K), norms=norms), state, total=50)
        assert np.all(obs >= low) and np.all(obs <= high) and np.all(np.isfinite(obs))


def test_state_round_trips():
    _, _, state = build(sig(1, [5.0, 4.0, 6.0, 3.0]), ObservationState())
    restored = ObservationState.from_state_dict(state.state_dict())
    a, _, _ = build(sig(2, [4.0, 3.0, 5.0, 2.0]), state)
    b, _, _ = build(sig(2, [4.0, 3.0, 5.0, 2.0]), restored)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown keys"):
        ObservationState.from_state_dict({"bogus": None})
