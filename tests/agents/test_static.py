"""Static mixers: uniform, natural (token-proportional) and fixed (by domain name)."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces

from agents import AgentConfig, StaticMixer, build_mixer
from agents.base import Transition

NAMES = ["web", "code", "junk"]
OBS = np.zeros(2, np.float32)


def _static(kind: str, floor: float = 0.0, natural: np.ndarray | None = None, **cfg: object) -> StaticMixer:
    mixer = build_mixer(
        AgentConfig(kind=kind, **cfg),
        spaces.Box(-1.0, 1.0, (2,), np.float32),
        spaces.Box(0.0, 1.0, (3,), np.float64),
        seed=0,
        domain_names=NAMES,
        natural_weights=natural,
        total_steps=10,
        floor=floor,
    )
    assert isinstance(mixer, StaticMixer)
    return mixer


def test_uniform() -> None:
    mixer = _static("uniform")
    np.testing.assert_allclose(mixer.act(OBS), np.full(3, 1 / 3))
    mixer.observe(Transition.from_step(OBS, mixer.act(OBS), 1.0, OBS, {}))
    assert mixer.update() == {}
    np.testing.assert_allclose(mixer.act(OBS), np.full(3, 1 / 3))


def test_natural_is_token_proportional_and_needs_token_counts() -> None:
    np.testing.assert_allclose(
        _static("natural", natural=np.array([6.0, 3.0, 1.0])).act(OBS), [0.6, 0.3, 0.1]
    )
    with pytest.raises(ValueError, match="natural_weights"):
        _static("natural")


def test_fixed_by_name_missing_names_get_the_floor() -> None:
    np.testing.assert_allclose(
        _static("fixed", weights={"web": 3.0, "code": 1.0}).act(OBS), [0.75, 0.25, 0.0]
    )
    weights_K = _static("fixed", floor=0.05, weights={"web": 3.0, "code": 1.0}).act(OBS)
    # Euclidean projection: the 0.05 lifting junk to the floor is taken equally from web and code.
    np.testing.assert_allclose(weights_K, [0.725, 0.225, 0.05])


def test_fixed_rejects_names_not_in_the_corpus() -> None:
    with pytest.raises(
        ValueError, match=r"\['wiki'\] that are not domains; domains are \['web', 'code', 'junk'\]"
    ):
        _static("fixed", weights={"web": 1.0, "wiki": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        _static("fixed", weights={"web": 0.0})


def test_state_round_trip_checks_the_mixture() -> None:
    a = _static("fixed", weights={"web": 1.0})
    a.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="differs from the config's"):
        _static("fixed", weights={"code": 1.0}).load_state_dict(a.state_dict())
