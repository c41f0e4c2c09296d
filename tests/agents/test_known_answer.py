"""Known-answer learning (SB3 ``test_identity`` style): AC-ODM must find the aligned domain and avoid junk.

The self-contained ``AlignmentBandit`` mimics the env's reward maths without importing ``envs``: hidden
per-domain gradient directions give the alignment scores ``s`` (off-diagonal Gram row sums over the
mean gradient norm, z-scored over domains), the reward parts are ``w_i * s_i`` (the env's ``mixture``
reward mode) and the per-domain losses make ODM's teacher *prefer* the junk domain (it has the highest
loss), so the actor must learn to move away from its warmup teacher.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import AgentConfig, ExplorationConfig, build_mixer
from envs.config import EnvConfig
from envs.env import DataMixingEnv
from envs.simulated import SimulatedConfig


class AlignmentBandit:
    """K domains: K-2 ordinary domains sharing half a common gradient direction plus their own, one aligned
    domain (exactly the common direction: it agrees with all others) and one junk domain (a direction
    opposed to the common one). Stateless apart from a progress feature; seeded noise on gradients.

    Observation (S = K + 1): the z-scored per-domain losses with noise, then progress in [0, 1].
    """

    def __init__(self, num_domains: int = 6, total_steps: int = 1000, seed: int = 0, dim: int = 32) -> None:
        self.num_domains, self.total_steps = num_domains, total_steps
        self.rng = np.random.default_rng(seed)
        common_D = np.zeros(dim)
        common_D[0] = 1.0
        own_KD = 0.5 * self.rng.normal(size=(num_domains, dim)) / np.sqrt(dim)
        own_KD[:, 0] = 0.0
        self.grads_KD = 0.5 * common_D + own_KD
        self.aligned, self.junk = num_domains - 2, num_domains - 1
        self.grads_KD[self.aligned] = common_D
        self.grads_KD[self.junk] = -0.5 * common_D + own_KD[self.junk]
        self.base_loss_K = np.linspace(3.0, 4.0, num_domains)
        self.base_loss_K[self.junk] = 7.0  # random tokens: the highest loss, ODM's favourite
        self.observation_space = spaces.Box(-5.0, 5.0, (num_domains + 1,), np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (num_domains,), np.float32)
        self.domain_names = [f"d{i}" for i in range(num_domains - 2)] + ["aligned", "junk"]
        self.step_count = 0

    def _obs(self, loss_K: np.ndarray) -> np.ndarray:
        z_K = (loss_K - loss_K.mean()) / (loss_K.std(ddof=1) + 1e-8)
        return np.append(z_K, self.step_count / self.total_steps).astype(np.float32)

    def reset(self) -> np.ndarray:
        self.step_count = 0
        return self._obs(self.base_loss_K)

    def step(self, weights_K: np.ndarray) -> tuple[np.ndarray, float, dict]:
        grads_KD = self.grads_KD + 0.3 * self.rng.normal(size=self.grads_KD.shape) / np.sqrt(
            self.grads_KD.shape[1]
        )
        gram_KK = grads_KD @ grads_KD.T
        raw_K = (gram_KK.sum(1) - np.diag(gram_KK)) / (np.sqrt(np.diag(gram_KK)).mean() + 1e-6)
        scores_K = np.clip((raw_K - raw_K.mean()) / (raw_K.std(ddof=1) + 1e-8), -3, 3)
        parts_K = weights_K * scores_K
        self.step_count += 1
        loss_K = self.base_loss_K * (1 - 0.2 * self.step_count / self.total_steps) + 0.05 * self.rng.normal(
            size=self.num_domains
        )
        info = {"reward_parts_K": parts_K, "loss_K": loss_K, "scores_K": scores_K, "weights_K": weights_K}
        return self._obs(loss_K), float(parts_K.sum()), info


def known_answer_config(**overrides: object) -> AgentConfig:
    """Small, fast hyperparameters tuned for this test (the defaults target 41k-step LM runs)."""
    base: dict[str, object] = dict(
        hidden_width=64,
        num_hidden_layers=2,
        actor_lr=1e-4,
        critic_lr=1e-3,
        tau=0.05,
        gamma=0.5,  # a bandit: the action-dependent part of Q is the immediate reward
        batch_size=32,
        warmup_fraction=0.05,
        exploration=ExplorationConfig(kind="logit_gaussian", scale=1.0, decay=0.998, min_scale=0.1),
    )
    base.update(overrides)
    return AgentConfig(**base)


def run_bandit(
    seed: int, num_steps: int, config: AgentConfig, num_domains: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Train AC-ODM online for ``num_steps`` decisions; returns (greedy final weights, teacher's warmup weights)."""
    env = AlignmentBandit(num_domains=num_domains, total_steps=num_steps, seed=1000 + seed)
    mixer = build_mixer(
        config,
        env.observation_space,
        env.action_space,
        seed=seed,
        domain_names=env.domain_names,
        total_steps=num_steps,
        floor=0.01,
    )
    obs = env.reset()
    teacher_weights = []
    for _ in range(num_steps):
        warmup = mixer.in_warmup
        weights_K = mixer.act(obs, explore=True)
        if warmup:
            teacher_weights.append(weights_K)
        next_obs, reward, info = env.step(weights_K)
        mixer.observe(obs, weights_K, reward, next_obs, info)
        mixer.update()
        obs = next_obs
    return mixer.act(obs, explore=False), np.mean(teacher_weights, axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ac_odm_learns_aligned_domain_and_avoids_junk(seed: int) -> None:
    torch.set_num_threads(1)
    num_domains = 6
    final_K, teacher_K = run_bandit(
        seed, num_steps=600, config=known_answer_config(), num_domains=num_domains
    )
    uniform = 1.0 / num_domains
    junk, aligned = num_domains - 1, num_domains - 2
    # The warmup teacher (ODM smoothed mean) prefers the junk domain: the actor had to unlearn it.
    assert teacher_K[junk] > uniform
    assert final_K[junk] < uniform, final_K
    assert final_K[aligned] > uniform, final_K
    assert final_K.argmax() == aligned, final_K


def run_simulated(
    seed: int, num_steps: int, floor: float
) -> tuple[DataMixingEnv, np.ndarray, np.ndarray, np.ndarray]:
    """AC-ODM online on ``DataMixingEnv`` over ``SimulatedBackend``'s default five domains."""
    env = DataMixingEnv(
        simulated=SimulatedConfig(total_steps=num_steps), env_config=EnvConfig(action_floor=floor)
    )
    mixer = build_mixer(
        known_answer_config(),
        env.observation_space,
        env.action_space,
        seed=seed,
        domain_names=env.domain_names,
        natural_weights=env.natural_weights_K,
        total_steps=num_steps,
        floor=floor,
    )
    obs, _ = env.reset(seed=seed)
    applied, rewards = [], []
    for _ in range(num_steps):
        weights_K = mixer.act(obs, explore=True)
        next_obs, reward, terminated, truncated, info = env.step(weights_K)
        assert not terminated
        mixer.observe(obs, weights_K, reward, next_obs, info)
        mixer.update()
        applied.append(info["weights_K"])
        rewards.append(reward)
        obs = next_obs
    assert truncated
    return env, mixer.act(obs, explore=False), np.array(applied), np.array(rewards)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ac_odm_on_simulated_backend_prefers_the_hub_and_avoids_junk(seed: int) -> None:
    torch.set_num_threads(1)
    env, final_K, applied_TK, rewards_T = run_simulated(seed, num_steps=600, floor=0.01)
    uniform = 1.0 / env.num_domains
    hub, junk = env.domain_names.index("wiki"), env.domain_names.index("junk")
    for weights_K in (final_K, applied_TK[-100:].mean(axis=0)):
        assert weights_K[junk] < uniform, weights_K
        assert weights_K[hub] > uniform, weights_K
    # The reward <w, s> of a uniform mixture is the mean z-scored score, about 0; the learned mixture earns more.
    assert rewards_T[-100:].mean() > 0.5, rewards_T[-100:].mean()
