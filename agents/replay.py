"""A fixed-size FIFO replay buffer of mixing transitions (numpy ring buffer, seeded sampling).

Dimension legend: N = capacity, B = batch, K = domains, S = observation features.

A transition is ``(obs_S, weights_K, rewards_K, next_obs_S)``: the mixture is the action, the reward
is the K-vector of per-domain reward parts (the critic's heads). There is no ``done`` flag: the data
mixing task never terminates (a run's end is a truncation, which still bootstraps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch


class ReplayBatch(NamedTuple):
    """A sampled minibatch (float32 numpy arrays)."""

    obs_BS: np.ndarray
    weights_BK: np.ndarray
    rewards_BK: np.ndarray
    next_obs_BS: np.ndarray


_FIELDS = ("obs_NS", "weights_NK", "rewards_NK", "next_obs_NS")


class ReplayBuffer:
    """Ring buffer of the last ``capacity`` transitions; sampling uses the buffer's own generator.

    Args:
        capacity: maximum number of transitions kept (the oldest is overwritten first).
        obs_dim: S.
        num_domains: K.
        rng: the seeded generator every ``sample`` draws from (owned by the buffer from now on).
    """

    def __init__(self, capacity: int, obs_dim: int, num_domains: int, rng: np.random.Generator) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.obs_dim = int(obs_dim)
        self.num_domains = int(num_domains)
        self.rng = rng
        self.obs_NS = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.weights_NK = np.zeros((capacity, num_domains), dtype=np.float32)
        self.rewards_NK = np.zeros((capacity, num_domains), dtype=np.float32)
        self.next_obs_NS = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots

    def __len__(self) -> int:
        return self.size

    def add(
        self, obs_S: np.ndarray, weights_K: np.ndarray, rewards_K: np.ndarray, next_obs_S: np.ndarray
    ) -> None:
        """Store one transition, overwriting the oldest once full."""
        self.obs_NS[self.pos] = obs_S
        self.weights_NK[self.pos] = weights_K
        self.rewards_NK[self.pos] = rewards_K
        self.next_obs_NS[self.pos] = next_obs_S
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> ReplayBatch:
        """``batch_size`` transitions drawn uniformly with replacement (works while the buffer is small)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx_B = self.rng.integers(0, self.size, size=batch_size)
        return ReplayBatch(
            self.obs_NS[idx_B], self.weights_NK[idx_B], self.rewards_NK[idx_B], self.next_obs_NS[idx_B]
        )

    def state_dict(self) -> dict[str, Any]:
        """Contents (as tensors, so ``torch.load(weights_only=True)`` accepts them), cursor and RNG state."""
        state: dict[str, Any] = {
            "capacity": self.capacity,
            "obs_dim": self.obs_dim,
            "num_domains": self.num_domains,
            "pos": self.pos,
            "size": self.size,
            "rng": self.rng.bit_generator.state,
        }
        for name in _FIELDS:
            state[name] = torch.from_numpy(getattr(self, name)[: self.size].copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore contents, cursor and RNG state; a buffer of another shape is rejected."""
        got = (state["capacity"], state["obs_dim"], state["num_domains"])
        want = (self.capacity, self.obs_dim, self.num_domains)
        if got != want:
            raise ValueError(f"replay buffer state has (capacity, obs_dim, K) = {got}, expected {want}")
        size = int(state["size"])
        for name in _FIELDS:
            array = getattr(self, name)
            array[:] = 0
            array[:size] = np.asarray(state[name], dtype=np.float32)
        self.pos = int(state["pos"])
        self.size = size
        self.rng.bit_generator.state = state["rng"]
