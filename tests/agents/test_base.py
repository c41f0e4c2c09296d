"""The Mixer protocol, the registry, ``build_mixer``'s checks, the simplex projection and config validation."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from gymnasium import spaces
from pydantic import ValidationError

from agents import AgentConfig, Mixer, build_mixer, mixer_kinds, project_to_simplex
from agents.config import AgentKind

K, S = 4, 7
NAMES = ["a", "b", "c", "d"]


def _spaces(k: int = K, s: int = S) -> tuple[spaces.Box, spaces.Box]:
    return spaces.Box(-5.0, 5.0, (s,), np.float32), spaces.Box(0.0, 1.0, (k,), np.float32)


def _config(kind: str) -> AgentConfig:
    extra = {"weights": {"a": 1.0}} if kind == "fixed" else {}
    return AgentConfig(kind=kind, hidden_width=8, num_hidden_layers=1, **extra)


def _build(kind: str = "uniform", **kwargs: typing.Any) -> Mixer:
    obs_space, act_space = _spaces()
    args: dict[str, typing.Any] = dict(
        seed=0, domain_names=NAMES, natural_weights=np.arange(1.0, K + 1), total_steps=100, floor=0.0
    )
    args.update(kwargs)
    return build_mixer(_config(kind), obs_space, act_space, **args)


def _projection_oracle(w_K: np.ndarray, floor: float) -> np.ndarray:
    """Bisection on the threshold theta of sum(max(w - floor - theta, 0)) = 1 - K floor."""
    v_K, budget = w_K - floor, 1.0 - len(w_K) * floor
    lo, hi = v_K.min() - budget, v_K.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v_K - mid, 0).sum() > budget else (lo, mid)
    return np.maximum(v_K - 0.5 * (lo + hi), 0) + floor


def test_registry_covers_every_configurable_kind() -> None:
    assert mixer_kinds() == sorted(typing.get_args(AgentKind))


@pytest.mark.parametrize("kind", typing.get_args(AgentKind))
def test_every_kind_builds_a_mixer_whose_actions_are_on_the_simplex(kind: str) -> None:
    mixer = _build(kind, floor=0.05)
    assert isinstance(mixer, Mixer)
    weights_K = mixer.act(np.zeros(S, np.float32), explore=True)
    assert weights_K.shape == (K,) and weights_K.dtype == np.float32
    assert abs(float(weights_K.sum()) - 1.0) < 1e-6
    assert np.all(weights_K >= np.float32(0.05))


def test_build_mixer_rejects_floor_at_or_above_one_over_k() -> None:
    with pytest.raises(ValueError, match=r"floor=0\.25 .*1/K.*K=4"):
        _build(floor=0.25)
    with pytest.raises(ValueError, match="floor"):
        _build(floor=-0.01)


def test_build_mixer_rejects_unknown_kind_naming_the_field() -> None:
    bogus = AgentConfig.model_construct(kind="dqn")
    obs_space, act_space = _spaces()
    with pytest.raises(ValueError, match=r"agent\.kind = 'dqn'.*expected one of"):
        build_mixer(bogus, obs_space, act_space, seed=0, domain_names=NAMES, total_steps=10)


def test_build_mixer_rejects_inconsistent_domains_and_spaces() -> None:
    with pytest.raises(ValueError, match="domain_names has 3 names but action_space has K=4"):
        _build(domain_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="unique"):
        _build(domain_names=["a", "a", "c", "d"])
    with pytest.raises(ValueError, match=r"natural_weights must have shape \(4,\)"):
        _build(natural_weights=np.ones(3))
    with pytest.raises(ValueError, match="total_steps"):
        _build(total_steps=0)
    with pytest.raises(TypeError, match="observation_space must be a 1-D gymnasium Box"):
        build_mixer(
            _config("uniform"), spaces.Discrete(3), _spaces()[1], seed=0, domain_names=NAMES, total_steps=1
        )


def test_act_rejects_an_observation_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"obs must have shape \(7,\), got \(6,\)"):
        _build("ac_odm").act(np.zeros(S - 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", 1.0),
        ("gamma", -0.1),
        ("tau", 0.0),
        ("tau", 1.5),
        ("hidden_width", 0),
        ("num_hidden_layers", -1),
        ("batch_size", 0),
        ("kind", "dqn"),
        ("num_critics", 3),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        AgentConfig(**{field: value})


def test_config_accepts_the_boundaries() -> None:
    cfg = AgentConfig(gamma=0.0, tau=1.0)
    assert cfg.gamma == 0.0 and cfg.tau == 1.0


def test_projection_matches_a_bisection_oracle_and_keeps_the_floor() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        k = int(rng.integers(2, 9))
        floor = float(rng.uniform(0, 0.9 / k)) if trial % 2 else 0.0
        w_K = rng.normal(size=k) * rng.uniform(0.1, 3)
        got_K = project_to_simplex(w_K, floor)
        np.testing.assert_allclose(got_K, _projection_oracle(w_K, floor), atol=1e-9)
        assert abs(got_K.sum() - 1.0) < 1e-12 and got_K.min() >= floor - 1e-15


def test_projection_is_idempotent_on_the_floored_simplex() -> None:
    w_K = np.array([0.7, 0.1, 0.05, 0.15])
    np.testing.assert_array_equal(project_to_simplex(w_K, 0.05), w_K)
    # Lifting the two zeros to the floor lowers every weight above the threshold by the same amount.
    np.testing.assert_allclose(
        project_to_simplex(np.array([0.9, 0.1, 0.0, 0.0]), 0.05), [0.85, 0.05, 0.05, 0.05]
    )


def test_projection_rejects_non_finite_weights() -> None:
    with pytest.raises(ValueError, match="finite"):
        project_to_simplex(np.array([0.5, np.nan]))


def test_mixer_learns_says_which_kinds_need_an_agent_process() -> None:
    from agents.base import mixer_learns

    assert [k for k in mixer_kinds() if not mixer_learns(k)] == ["fixed", "natural", "uniform"]
    assert mixer_learns("ac_odm") and mixer_learns("exp3") and mixer_learns("smoothed_mean")
    with pytest.raises(ValueError, match="'nope' is not a known mixer"):
        mixer_learns("nope")


def test_a_policy_applies_to_ac_odm_only() -> None:
    with pytest.raises(ValueError, match="policy applies to kind 'ac_odm'.*not 'greedy'"):
        AgentConfig(kind="greedy", policy="runs/x/policy.pt")
    assert AgentConfig(kind="ac_odm", policy="runs/x/policy.pt").mode == "online"  # a warm start
