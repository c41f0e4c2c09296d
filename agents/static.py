"""Static mixtures: ``uniform``, ``natural`` (token-proportional) and ``fixed`` (weights by domain name).

Dimension legend: K = domains.

A static mixer returns the same mixture at every step and learns nothing. ``uniform`` gives each
domain 1/K (the sampler's largest-remainder quotas make it stratified); ``natural`` is the corpus's
token share per domain (from the prepared manifest, handed in as ``natural_weights``); ``fixed`` takes
``config.weights`` by domain name (names not in the corpus are an error, domains not named get 0, then
the floor lifts them to ``floor``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agents.base import BaseMixer, Transition, register_mixer


@register_mixer("uniform", "natural", "fixed")
class StaticMixer(BaseMixer):
    """One mixture for the whole run (``config.kind`` in ``uniform``, ``natural``, ``fixed``)."""

    learns = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.num_domains
        if self.kind == "uniform":
            weights_K = np.full(k, 1.0 / k)
        elif self.kind == "natural":
            if self.natural_weights_K is None:
                raise ValueError("agent.kind 'natural' needs natural_weights (token counts per domain)")
            weights_K = self.natural_weights_K
        elif self.kind == "fixed":
            weights_K = self._fixed_weights(self.config.weights or {})
        else:
            raise ValueError(f"StaticMixer handles kinds uniform, natural and fixed, not {self.kind!r}")
        self.weights_K = self._finish(weights_K)

    def _fixed_weights(self, by_name: Mapping[str, float]) -> np.ndarray:
        unknown = sorted(set(by_name) - set(self.domain_names))
        if unknown:
            raise ValueError(
                f"agent.weights names {unknown} that are not domains; domains are {self.domain_names}"
            )
        raw_K = np.array([float(by_name.get(name, 0.0)) for name in self.domain_names])
        return self._check_distribution(raw_K, name="agent.weights")

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The fixed mixture (a copy)."""
        self._check_obs(obs)
        return self.weights_K.copy()

    def observe(self, transition: Transition) -> None:
        """Nothing to learn."""

    def update(self) -> dict[str, float]:
        """Nothing to learn: no metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The header and the mixture (for the checkpoint's record)."""
        return {**self._header(), "weights_K": torch.tensor(self.weights_K, dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the header and that the stored mixture is this config's mixture."""
        self._check_header(state)
        stored_K = np.asarray(state["weights_K"], dtype=np.float64)
        if not np.allclose(stored_K, self.weights_K, rtol=0, atol=1e-6):
            raise ValueError(
                f"stored mixture {stored_K.tolist()} differs from the config's {self.weights_K.tolist()}"
            )
