"""ODM's multi-armed-bandit mixers (Albalak et al., Online Data Mixing): smoothed mean and EXP3.

Dimension legend: K = domains.

Both treat each domain as an arm whose reward is its training loss (a domain the model still finds
hard is worth more data), read from ``Transition.loss_K`` (NaN for a domain absent from the step, which is
then not updated, as in ODM's loop). Both mix with the uniform distribution at the decaying rate
``eps_t = min(1/K, sqrt(ln K / (K t)))`` (t = 1, 2, ... counts updates), so every weight is at least
``eps_t`` before the floor is applied. Note (spec B16): with ``eps_t = 1/K`` the factor ``1 - K eps_t``
is 0, so the weights are exactly uniform for the first ``t <= K ln K`` updates (68 for K = 22); this is
ODM's rule and is kept on purpose.

The bandits are closed-form and cheap, so they learn in ``observe`` (at the step boundary, like ODM's
``group_update``); ``update()`` only reports their diagnostics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agents.base import BaseMixer, Transition, exploration_epsilon, register_mixer

log = logging.getLogger(__name__)


class _OdmBandit(BaseMixer):
    """Shared state of the ODM bandits: the distribution ``p_K``, the update count t and eps."""

    _stat_name = "stat"  # name of the per-domain statistic in state_dict

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.num_domains
        uniform_K = np.full(k, 1.0 / k)
        # ODM starts from the normalised initial weights (AC-ODM's warmup: the corpus's natural weights).
        self.probabilities_K = uniform_K if self.natural_weights_K is None else self.natural_weights_K.copy()
        self.stat_K = np.zeros(k)  # smoothed reward R (smoothed mean) or importance-weighted sum G (EXP3)
        self.num_updates = 0
        self.epsilon = 1.0 / k  # eps_0
        self.prev_epsilon = 1.0 / k

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The current bandit distribution on the floored simplex (``explore`` is built into eps_t)."""
        self._check_obs(obs)
        return self._finish(self.probabilities_K)

    def observe(self, transition: Transition) -> None:
        """One ODM ``group_update`` with this step's per-domain losses ``transition.loss_K``."""
        loss_K = self._check_vector(transition.loss_K, "loss_K")
        present_K = np.isfinite(loss_K)
        if not present_K.any():
            log.warning("%s: no finite per-domain loss in this step; the bandit is not updated", self.kind)
            return
        self.num_updates += 1
        self.prev_epsilon, self.epsilon = (
            self.epsilon,
            exploration_epsilon(self.num_domains, self.num_updates),
        )
        self._group_update(loss_K, present_K)

    def _group_update(self, loss_K: np.ndarray, present_K: np.ndarray) -> None:
        raise NotImplementedError

    def update(self) -> dict[str, float]:
        """Diagnostics only (the bandit already learned in ``observe``)."""
        return {"agent/epsilon": float(self.epsilon), "agent/num_updates": float(self.num_updates)}

    def state_dict(self) -> dict[str, Any]:
        """Distribution, statistic, update count and eps (plus the K/S/names header)."""
        return {
            **self._header(),
            "probabilities_K": torch.tensor(self.probabilities_K, dtype=torch.float64),
            self._stat_name: torch.tensor(self.stat_K, dtype=torch.float64),
            "num_updates": self.num_updates,
            "epsilon": self.epsilon,
            "prev_epsilon": self.prev_epsilon,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a state of another kind, K, observation size or domain list is rejected."""
        self._check_header(state)
        self.probabilities_K = np.asarray(state["probabilities_K"], dtype=np.float64).copy()
        self.stat_K = np.asarray(state[self._stat_name], dtype=np.float64).copy()
        self.num_updates = int(state["num_updates"])
        self.epsilon = float(state["epsilon"])
        self.prev_epsilon = float(state["prev_epsilon"])


@register_mixer("smoothed_mean")
class SmoothedMeanMixer(_OdmBandit):
    """ODM's paper method (``SmoothedMeanWeightUpdater.group_update``; docs/reference.md, R4), also AC-ODM's warmup teacher.

    Per update t: ``R_i <- alpha R_i + (1 - alpha) exp(L_i)`` for each present domain i (R starts at 0;
    alpha = ``config.smoothing``), then the *linear* normalisation
    ``p_i = (1 - K eps_t) R_i / sum_j R_j + eps_t``.
    """

    _stat_name = "smoothed_reward_K"

    def _group_update(self, loss_K: np.ndarray, present_K: np.ndarray) -> None:
        alpha = self.config.smoothing
        smoothed_K = self.stat_K.copy()
        smoothed_K[present_K] = alpha * smoothed_K[present_K] + (1.0 - alpha) * np.exp(loss_K[present_K])
        if not np.all(np.isfinite(smoothed_K)):
            raise ValueError(f"smoothed_mean: exp(loss) overflowed for losses {loss_K.tolist()}")
        self.stat_K = smoothed_K
        k, eps = self.num_domains, self.epsilon
        self.probabilities_K = (1.0 - k * eps) * smoothed_K / smoothed_K.sum() + eps


@register_mixer("exp3")
class Exp3Mixer(_OdmBandit):
    """ODM's EXP3 (``Exp3WeightUpdater.group_update``; docs/reference.md, R4) with an overflow-safe softmax.

    Per update t: the importance-weighted estimate ``G_i += r_i / p_i`` for each present domain, with
    ``r_i = exp3_reward_scale * L_i`` (ODM divides the loss by 10) and ``p`` the distribution the step
    was sampled from; then ``p_i = (1 - K eps_t) softmax(eps_{t-1} G)_i + eps_t``. The softmax subtracts
    its maximum first (ODM's plain ``exp`` overflows once G grows), which leaves the result unchanged.
    """

    _stat_name = "estimated_reward_K"

    def _group_update(self, loss_K: np.ndarray, present_K: np.ndarray) -> None:
        rewards_K = self.config.exp3_reward_scale * loss_K
        estimate_K = self.stat_K.copy()
        estimate_K[present_K] += rewards_K[present_K] / self.probabilities_K[present_K]
        self.stat_K = estimate_K
        logits_K = self.prev_epsilon * estimate_K
        exp_K = np.exp(logits_K - logits_K.max())
        k, eps = self.num_domains, self.epsilon
        self.probabilities_K = (1.0 - k * eps) * exp_K / exp_K.sum() + eps
