"""Networks (shapes, simplex head), target updates against an oracle, and the replay ring buffer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from agents import Actor, Critic, ReplayBuffer, polyak_update
from agents.networks import hard_update


def test_actor_outputs_rows_on_the_simplex_and_critic_one_value_per_domain() -> None:
    torch.manual_seed(0)
    actor, critic = Actor(7, 4, 16, 2), Critic(7, 4, 16, 2, num_critics=2)
    obs_BS = torch.randn(5, 7)
    weights_BK = actor(obs_BS)
    assert weights_BK.shape == (5, 4)
    torch.testing.assert_close(weights_BK.sum(-1), torch.ones(5))
    assert critic(obs_BS, weights_BK).shape == (2, 5, 4)
    torch.testing.assert_close(critic.q1(obs_BS, weights_BK), critic(obs_BS, weights_BK)[0])
    # Linear, LayerNorm, ReLU per hidden block, then the head.
    kinds = [type(m).__name__ for m in actor.net]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]


def test_polyak_update_matches_the_formula_and_checks_lengths() -> None:
    torch.manual_seed(0)
    online, target = Actor(3, 2, 8, 1), Actor(3, 2, 8, 1)
    before = [p.detach().clone() for p in target.parameters()]
    polyak_update(online.parameters(), target.parameters(), 0.25)
    for p, t_old, t_new in zip(online.parameters(), before, target.parameters(), strict=True):
        torch.testing.assert_close(t_new, 0.75 * t_old + 0.25 * p.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        polyak_update(list(online.parameters())[:-1], target.parameters(), 0.5)


def test_hard_update_copies_every_parameter() -> None:
    torch.manual_seed(0)
    online, target = Critic(3, 2, 8, 2), Critic(3, 2, 8, 2)
    hard_update(online, target)
    for p, t in zip(online.state_dict().values(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(p, t, rtol=0, atol=0)


def _buffer(capacity: int = 3, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, obs_dim=2, num_domains=2, rng=np.random.default_rng(seed))


def _add(buf: ReplayBuffer, i: int) -> None:
    buf.add(np.full(2, i), np.full(2, 0.5), np.full(2, i * 10), np.full(2, i + 1))


def test_replay_is_a_fifo_ring_buffer() -> None:
    buf = _buffer(capacity=3)
    for i in range(5):
        _add(buf, i)
    assert len(buf) == 3 and buf.pos == 2
    # Transitions 0 and 1 were overwritten by 3 and 4.
    assert sorted(buf.obs_NS[:, 0].tolist()) == [2.0, 3.0, 4.0]
    batch = buf.sample(64)
    assert set(batch.obs_BS[:, 0].tolist()) == {2.0, 3.0, 4.0}
    np.testing.assert_array_equal(batch.rewards_BK[:, 0], batch.obs_BS[:, 0] * 10)
    np.testing.assert_array_equal(batch.next_obs_BS[:, 0], batch.obs_BS[:, 0] + 1)


def test_replay_sampling_is_seeded_and_state_round_trips() -> None:
    a, b = _buffer(capacity=10, seed=7), _buffer(capacity=10, seed=7)
    for i in range(6):
        _add(a, i)
        _add(b, i)
    np.testing.assert_array_equal(a.sample(8).obs_BS, b.sample(8).obs_BS)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    c = _buffer(capacity=10, seed=999)
    c.load_state_dict(torch.load(blob, weights_only=True))
    assert (len(c), c.pos) == (len(a), a.pos)
    for _ in range(3):
        np.testing.assert_array_equal(a.sample(8).obs_BS, c.sample(8).obs_BS)
    with pytest.raises(ValueError, match="capacity, obs_dim, K"):
        _buffer(capacity=4).load_state_dict(a.state_dict())


def test_sampling_an_empty_buffer_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        _buffer().sample(1)
