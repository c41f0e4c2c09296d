"""The closed-form alignment mixers: greedy (one step ahead on the smoothed Gram matrix) and mirror descent."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import AgentConfig, GreedyMixer, MirrorDescentMixer, build_mixer
from agents.base import Transition
from agents.greedy import (
    direction_objective,
    maximise_on_simplex,
    mirror_alignment,
    psd_projection,
    quadratic_objective,
)

K = 4
OBS = np.zeros(3, np.float32)


def make(kind: str, floor: float = 0.0, **overrides: object):
    return build_mixer(
        AgentConfig(kind=kind, **overrides),
        spaces.Box(-5.0, 5.0, (3,), np.float32),
        spaces.Box(0.0, 1.0, (K,), np.float32),
        seed=0,
        domain_names=["a", "b", "c", "junk"],
        total_steps=50,
        floor=floor,
    )


def geometry() -> np.ndarray:
    """Three complementary targets (a shared direction plus their own) and an opposed junk domain."""
    e = np.eye(5)
    return np.array([0.5 * e[0] + 0.8 * e[1], 0.5 * e[0] + 0.8 * e[2], 0.5 * e[0] + 0.8 * e[3], -e[0] + 0.2 * e[4]])


def info(rows: np.ndarray, present=(1, 1, 1, 1), **extra: object) -> dict:
    gram = rows @ rows.T
    return {
        "reward_gram_KK": gram,
        "gram_KK": gram,
        "microbatches_K": np.array(present),
        "target_mask_K": np.array([True, True, True, False]),
        "reward_parts_K": np.zeros(K),
        **extra,
    }


def test_greedy_plays_uniform_until_it_sees_a_gram_matrix_then_the_direction_optimum() -> None:
    mixer = make("greedy", floor=0.02)
    assert isinstance(mixer, GreedyMixer)
    np.testing.assert_allclose(mixer.act(OBS), np.full(K, 0.25))
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(geometry())))
    w = mixer.act(OBS)
    np.testing.assert_allclose(w, [0.98 / 3] * 3 + [0.02], atol=1e-4)  # junk at the floor, targets even
    assert mixer.update()["agent/max_weight"] == pytest.approx(w.max(), abs=1e-6)


def test_greedy_ignores_skipped_steps_and_pairs_never_seen_together() -> None:
    mixer = make("greedy")
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(geometry(), skipped=True)))
    assert mixer.num_updates == 0
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(geometry(), present=(1, 1, 0, 1))))
    assert not mixer.seen_KK[2].any() and mixer.seen_KK[0, 1]
    # the unseen target is not a target yet; the seen ones share the weight, junk gets none
    w = mixer.act(OBS)
    assert w[3] == pytest.approx(0.0, abs=1e-6) and w[0] == pytest.approx(w[1], abs=1e-4)


def test_greedy_moving_average_weights_new_steps_by_one_minus_beta() -> None:
    mixer = make("greedy", greedy_smoothing=0.75)
    first, second = geometry(), 2.0 * geometry()
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(first)))
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(second)))
    np.testing.assert_allclose(mixer.gram_KK, 0.75 * first @ first.T + 0.25 * second @ second.T)


def test_quadratic_objective_and_solver_find_the_known_maximiser() -> None:
    """For A = I (orthonormal targets) and lam = 1: max w.a - w.w/2 on the simplex with a = t/|t|^2 puts
    equal weight on the targets."""
    gram = np.eye(3)
    t = np.full(3, 1 / 3)
    w = maximise_on_simplex(lambda x: quadratic_objective(x, gram, t, 1.0), [np.array([0.8, 0.1, 0.1])], 0.0)
    np.testing.assert_allclose(w, np.full(3, 1 / 3), atol=1e-4)
    value, grad = direction_objective(np.full(3, 1 / 3), gram, t)
    assert value == pytest.approx(np.sqrt(1 / 3)) and np.allclose(grad, 0.0, atol=1e-12)


def test_psd_projection_clips_negative_eigenvalues() -> None:
    m = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    p = psd_projection(m)
    assert np.linalg.eigvalsh(p).min() >= -1e-12
    np.testing.assert_allclose(p, 1.5 * np.ones((2, 2)))


def test_mirror_alignment_is_leave_one_out_and_bounded() -> None:
    rows = geometry()
    a = mirror_alignment(rows @ rows.T, np.ones(K, bool), np.array([True, True, True, False]))
    assert a is not None and np.all(np.abs(a) <= 1 + 1e-12)
    # each target's cosine with the other two targets' mean: 0.25 / (0.94 * sqrt(0.25 + 0.32)) ~ 0.35, not 1
    assert a[:3] == pytest.approx([0.25 / np.sqrt(0.89 * 0.57)] * 3)
    assert a[3] < 0
    targets = np.array([True, True, True, False])
    # one target present: it has no other target to agree with (0); junk is compared with it
    a = mirror_alignment(rows @ rows.T, np.array([1, 0, 0, 1], bool), targets)
    assert a is not None and np.all(a[:3] == 0) and a[3] < 0
    assert mirror_alignment(rows @ rows.T, np.array([0, 0, 0, 1], bool), targets) is None


def test_mirror_descent_accumulates_a_persistent_signal_towards_a_vertex() -> None:
    """The same linear signal every step, accumulated: the mixture keeps concentrating (issue 13)."""
    e = np.eye(5)
    rows = np.array([0.8 * e[0] + 0.6 * e[1], 0.5 * e[0] + 0.87 * e[2], 0.5 * e[0] + 0.87 * e[3], -e[0]])
    mixer = make("mirror_descent", mirror_descent_lr=0.5)
    assert isinstance(mixer, MirrorDescentMixer)
    largest = []
    for _ in range(60):
        mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(rows)))
        largest.append(mixer.act(OBS).max())
    assert np.all(np.diff(largest) >= -1e-12) and largest[-1] > 0.9


@pytest.mark.parametrize("kind", ["greedy", "mirror_descent"])
def test_state_dict_round_trip_continues_exactly(kind: str) -> None:
    rng = np.random.default_rng(0)
    mixer = make(kind, floor=0.01)
    for _ in range(5):
        mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, info(geometry() + 0.1 * rng.normal(size=(K, 5)))))
    blob = io.BytesIO()
    torch.save(mixer.state_dict(), blob)
    blob.seek(0)
    restored = make(kind, floor=0.01)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    for _ in range(5):
        step = info(geometry() + 0.1 * rng.normal(size=(K, 5)))
        mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 0.0, OBS, step))
        restored.observe(Transition.from_step(OBS, restored.act(OBS), 0.0, OBS, step))
        np.testing.assert_array_equal(mixer.act(OBS), restored.act(OBS))
    other = build_mixer(
        AgentConfig(kind=kind),
        spaces.Box(-5.0, 5.0, (3,), np.float32),
        spaces.Box(0.0, 1.0, (K + 1,), np.float32),
        seed=0,
        domain_names=["a", "b", "c", "d", "junk"],
        total_steps=50,
    )
    with pytest.raises(ValueError, match="state is for"):
        other.load_state_dict(mixer.state_dict())
