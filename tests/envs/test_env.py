"""DataMixingEnv on the simulated backend: Gymnasium contract, determinism, resume, agents."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.config import EnvConfig
from envs.env import ENV_ID, DataMixingEnv, StepSignals, project_action
from envs.simulated import SimulatedConfig

# Warnings check_env may raise that we accept, with the reason. Empty: none is expected.
CHECK_ENV_WARNING_WHITELIST: tuple[str, ...] = ()


def checked(env: gym.Env) -> list[str]:
    """Run check_env and return the messages of warnings outside the whitelist."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    return [
        str(w.message) for w in caught if not any(s in str(w.message) for s in CHECK_ENV_WARNING_WHITELIST)
    ]


def test_make_without_arguments_builds_a_simulated_env_that_passes_check_env():
    env = gym.make(ENV_ID)
    assert env.unwrapped.domain_names == ["web", "books", "code", "wiki", "junk"]
    assert env.observation_space.shape == (3 * 5 + 2 * 4 + 1,)
    assert checked(env) == []
    env.close()


def rollout(seed: int, steps: int, **kwargs):
    env = gym.make(ENV_ID, **kwargs)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        out += [obs, reward, terminated, truncated, info["weights_K"], info["scores_K"], info["gram_KK"]]
    env.close()
    return out


def same(a: list, b: list) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_two_envs_with_one_seed_give_identical_rollouts():
    a, b = rollout(7, 30), rollout(7, 30)
    assert same(a, b)
    assert not same(a, rollout(8, 30))


@pytest.mark.parametrize(
    "env_config",
    [EnvConfig(), EnvConfig(reward_mode="reference", observation_mode="reference", action_floor=0.02)],
)
def test_full_episode_stays_finite_and_inside_the_spaces(env_config):
    env = DataMixingEnv(env_config=env_config)
    obs, _ = env.reset(seed=0)
    steps, truncated = 0, False
    rng = np.random.default_rng(0)
    while not truncated:
        action = rng.dirichlet(np.full(5, 0.3)).astype(np.float32)  # often nearly-absent domains
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        assert obs in env.observation_space and np.all(np.isfinite(obs))
        assert np.isfinite(reward) and abs(reward) <= env_config.clamp
        assert not terminated
        w = info["weights_K"]
        assert w.min() >= env_config.action_floor - 1e-12 and w.sum() == pytest.approx(1.0)
        assert np.all(np.isfinite(info["scores_K"])) and np.all(np.isfinite(info["reward_parts_K"]))
        if env_config.reward_mode != "reference":
            assert reward == pytest.approx(float(np.sum(info["reward_parts_K"])))
        else:
            assert reward == pytest.approx(float(np.mean(info["reward_parts_K"])))
    assert steps == env.total_steps == 200 and info["step"] == 200
    if env_config.observation_mode == "reference":
        assert obs[-1] == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.full(5, 0.2))


def test_info_carries_the_contract_keys():
    env = DataMixingEnv()
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0.5, 0.1, 0.1, 0.2, 0.1]))
    for key in ("weights_K", "loss_K", "scores_K", "reward_parts_K", "gram_KK", "raw_features", "signals"):
        assert key in info
    assert isinstance(info["signals"], StepSignals) and info["signals"].step == 1
    assert info["gram_KK"].shape == (5, 5) and "eval" not in info
    evaluation = env.evaluate()
    assert set(evaluation) >= {"val/mean_ppl", "val/loss/junk", "val/ppl/wiki"}


def test_steps_per_action_and_budget_truncation():
    env = DataMixingEnv(env_config=EnvConfig(steps_per_action=3), simulated=SimulatedConfig(total_steps=7))
    env.reset(seed=0)
    steps = []
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(np.full(5, 0.2))
        steps.append((info["step"], len(info["step_signals"])))
    assert steps == [(3, 3), (6, 3), (7, 1)]


def test_state_dict_resumes_exactly():
    actions = np.random.default_rng(1).random((12, 5)).astype(np.float32)
    a = DataMixingEnv()
    a.reset(seed=5)
    for act in actions[:6]:
        a.step(act)
    state = a.state_dict()
    expected = [a.step(act) for act in actions[6:]]
    b = DataMixingEnv()
    b.load_state_dict(state)
    for act, (obs, reward, _, trunc, info) in zip(actions[6:], expected, strict=True):
        obs2, reward2, _, trunc2, info2 = b.step(act)
        assert np.array_equal(obs, obs2) and reward == reward2 and trunc == trunc2
        assert info["signals"] == info2["signals"]
    assert a.np_random.bit_generator.state == b.np_random.bit_generator.state
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({"version": 99})


def test_env_state_loads_with_torch_weights_only():
    import io

    import torch

    env = DataMixingEnv()
    env.reset(seed=0)
    env.step(np.full(5, 0.2))
    buf = io.BytesIO()
    torch.save(env.state_dict(), buf)
    buf.seek(0)
    restored = DataMixingEnv()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert np.array_equal(restored.step(np.full(5, 0.2))[0], env.step(np.full(5, 0.2))[0])


def test_accepts_a_backend_instance_and_step_signals_compare_by_value():
    from envs.simulated import SimulatedBackend

    env = DataMixingEnv(backend=SimulatedBackend(SimulatedConfig(min_per_domain=0)))
    env.reset(seed=0)
    info = env.step(np.array([1.0, 0, 0, 0, 0]))[4]
    sig = info["signals"]
    assert np.isnan(sig.loss_K[1])  # an absent domain
    twin = StepSignals.of(sig)
    assert twin == sig and twin is not sig
    assert StepSignals(**{**twin.__dict__, "timings": {"step": 1.0}}) == sig  # host timings are ignored
    assert StepSignals(**{**twin.__dict__, "loss": sig.loss + 1}) != sig
    with pytest.raises(TypeError, match="TrainerBackend"):
        DataMixingEnv(backend=object())  # type: ignore[arg-type]


def test_project_action_keeps_a_mixture_that_already_respects_the_floor():
    w = np.array([0.05, 0.15, 0.3, 0.5])
    np.testing.assert_array_equal(project_action(w, floor=0.05), w)
    # below the floor: floor + (1 - K floor) p
    np.testing.assert_allclose(project_action(np.array([0.0, 0.5, 0.5, 0.0]), floor=0.05),
                               [0.05, 0.45, 0.45, 0.05])


def test_project_action():
    w = project_action(np.array([2.0, 0.0, -1.0, 2.0]), floor=0.05)
    np.testing.assert_allclose(w, [0.05 + 0.8 * 0.5, 0.05, 0.05, 0.05 + 0.8 * 0.5])
    np.testing.assert_allclose(project_action(np.zeros(4), floor=0.0), np.full(4, 0.25))
    np.testing.assert_allclose(
        project_action(np.array([1.0, 3.0]), 0.1), project_action(np.array([2.0, 6.0]), 0.1)
    )
    with pytest.raises(ValueError, match="floor"):
        project_action(np.ones(4), floor=0.25)


def test_bad_actions_and_arguments_are_clear_errors():
    env = DataMixingEnv()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.full(5, 0.2))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="5 finite numbers"):
        env.step(np.full(4, 0.25))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="needs config"):
        DataMixingEnv(backend="lm")
    with pytest.raises(ValueError, match="backend must be"):
        DataMixingEnv(backend="gpu")
    with pytest.raises(ValueError, match="action_floor"):
        DataMixingEnv(env_config=EnvConfig(action_floor=0.2))
    with pytest.raises(ValueError, match="no options"):
        env.reset(options={"x": 1})


def test_simulated_env_mirrors_an_experiment_config():
    from ray_jobs.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict(
        {
            "data": {
                "domains": [
                    {"name": "a", "source": {"paths": ["a.jsonl"]}},
                    {"name": "b", "source": {"paths": ["b.jsonl"]}},
                    {"name": "noise", "target": False, "source": {"paths": ["n.jsonl"]}},
                ]
            },
            "train": {"total_steps": 12},
            "env": {"reward_mode": "reference"},
        }
    )
    env = DataMixingEnv(cfg)
    assert env.domain_names == ["a", "b", "noise"] and env.total_steps == 12
    assert env.target_mask_K.tolist() == [True, True, False] and env.env_config.reward_mode == "reference"


def test_random_agent_runs_50_steps():
    env = gym.make(ENV_ID)
    env.action_space.seed(0)
    env.reset(seed=0)
    for _ in range(50):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs in env.observation_space and not terminated and not truncated
    env.close()


def mean_episode_reward(env: gym.Env, policy, seeds: list[int]) -> tuple[float, np.ndarray]:
    """Mean per-step reward of ``policy(obs)`` over one episode per seed, and the last mixture played."""
    rewards = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        truncated = False
        while not truncated:
            obs, reward, _, truncated, info = env.step(policy(obs))
            rewards.append(reward)
    return float(np.mean(rewards)), info["weights_K"]


@pytest.mark.slow
def test_td3_from_stable_baselines3_learns_the_best_mixture():
    """A Gymnasium client learns on the env (SB3's identity-env test, on our env): with the ``mixture``
    reward ``<w, s>`` (s: z-scored alignment scores, which rank the hub domain first and junk last),
    uniform and random mixtures earn about 0 and the best mixture is the hub's vertex. After 1000 steps
    TD3's deterministic policy must earn far more than uniform, random actions and its own untrained
    self, with the hub among its largest weights and junk at none."""
    import stable_baselines3 as sb3
    import torch

    torch.set_num_threads(1)

    def make() -> gym.Env:
        return gym.make(
            ENV_ID, simulated=SimulatedConfig(total_steps=50), env_config=EnvConfig(reward_mode="mixture")
        )

    env, evaluation = make(), make()
    names = env.unwrapped.domain_names
    hub, junk = names.index("wiki"), names.index("junk")
    model = sb3.TD3(
        "MlpPolicy",
        env,
        learning_starts=100,
        batch_size=64,
        train_freq=1,
        gradient_steps=1,
        policy_kwargs={"net_arch": [64, 64]},
        seed=0,
        device="cpu",
    )
    seeds = [100, 101, 102]

    def deterministic(obs):
        return model.predict(obs, deterministic=True)[0]

    untrained, _ = mean_episode_reward(evaluation, deterministic, seeds)
    uniform, _ = mean_episode_reward(evaluation, lambda obs: np.full(len(names), 0.2, np.float32), seeds)
    rng = np.random.default_rng(0)
    random, _ = mean_episode_reward(evaluation, lambda obs: rng.uniform(0, 1, len(names)), seeds)
    model.learn(total_timesteps=1000)
    assert model.num_timesteps == 1000
    trained, weights_K = mean_episode_reward(evaluation, deterministic, seeds)

    assert abs(uniform) < 0.1 and abs(random) < 0.1 and abs(untrained) < 0.1  # z-scores average out
    assert trained > max(uniform, random, untrained) + 0.4
    assert weights_K[hub] >= weights_K.max() - 1e-6 and weights_K[junk] < 0.05
    env.close()
    evaluation.close()


# ------------------------------------------------------------------------------------ LM backend
def lm_experiment(corpus_dir, *, total_steps: int = 50, **env):
    from ray_jobs.config import ExperimentConfig

    names = ["alpha", "beta", "gamma"]
    return ExperimentConfig.from_dict(
        {
            "data": {
                "prepared_dir": str(corpus_dir),
                "domains": [
                    {"name": n, "target": n != "gamma", "source": {"paths": [f"{n}.jsonl"]}} for n in names
                ],
            },
            "lm": {"preset": "tiny", "seq_len": 32, "precision": "fp32", "num_threads": 1},
            "optim": {"lr": 3e-3, "warmup_fraction": 0.1},
            # min_per_domain=1 keeps every domain present, as the reference does: check_env compares
            # infos with np.allclose, for which the NaN loss of an absent domain never equals itself.
            "sampler": {"micro_batch_size": 2, "grad_accum": 4, "min_per_domain": 1},
            "eval": {"max_batches": 1, "batch_size": 4},
            "train": {"total_steps": total_steps},
            "env": env,
        }
    )


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    from tests.envs.lm_fixtures import make_synthetic_corpus

    out = tmp_path_factory.mktemp("corpus")
    make_synthetic_corpus(out, targets=[True, True, False])
    return out


@pytest.mark.slow
def test_lm_env_passes_check_env(lm_corpus):
    env = gym.make(ENV_ID, backend="lm", config=lm_experiment(lm_corpus), device="cpu")
    assert env.unwrapped.num_layers == 4  # tiny has 4 blocks, fewer than the default 9
    assert checked(env) == []
    env.close()
    env.close()  # closing twice is fine


@pytest.mark.slow
def test_two_lm_envs_with_one_seed_give_identical_rollouts(lm_corpus):
    kwargs = {"backend": "lm", "config": lm_experiment(lm_corpus, total_steps=30), "device": "cpu"}
    a, b = rollout(4, 30, **kwargs), rollout(4, 30, **kwargs)
    assert same(a, b)
    assert a[-1] is not None and a[-4] is True  # truncated at the 30-step budget


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_lm_episode_of_50_steps_stays_finite_and_inside_the_spaces(lm_corpus, mode):
    cfg = lm_experiment(lm_corpus, probe={"mode": mode, "sketch_dim": 256}, action_floor=0.01)
    env = DataMixingEnv(cfg, backend="lm", device="cpu")
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    truncated, steps = False, 0
    while not truncated:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        assert obs in env.observation_space and np.all(np.isfinite(obs))
        assert np.isfinite(reward) and abs(reward) <= env.env_config.clamp and not terminated
        assert info["reward_valid"] and np.all(np.isfinite(info["gram_KK"]))
    assert steps == 50
    first, last = info["step_signals"][0], info["signals"]
    assert last.step == 50 and first.timings["probe"] >= 0
    evaluation = env.evaluate()
    assert np.isfinite(evaluation["val/mean_ppl"])
    env.close()
    assert env.unwrapped.backend.pretrainer is None  # close freed the model


@pytest.mark.slow
def test_lm_env_resumes_exactly(lm_corpus):
    import io

    import torch

    cfg = lm_experiment(lm_corpus, total_steps=8)
    actions = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    a = DataMixingEnv(cfg, backend="lm", device="cpu")
    a.reset(seed=3)
    for act in actions[:3]:
        a.step(act)
    buf = io.BytesIO()  # the model/optimizer tensors in the state are live references: serialise now
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what a checkpoint reader does
    expected = [a.step(act) for act in actions[3:]]
    b = DataMixingEnv(cfg, backend="lm", device="cpu")
    b.load_state_dict(state)
    for act, (obs, reward, _, _, info) in zip(actions[3:], expected, strict=True):
        obs2, reward2, _, _, info2 = b.step(act)
        assert np.array_equal(obs, obs2) and reward == reward2
        assert info["signals"] == info2["signals"]
    a.close()
    b.close()


@pytest.mark.slow
def test_lm_env_from_a_yaml_file_loaded_by_the_entry_point(lm_corpus, tmp_path):
    from ray_jobs.config import load_config, save_config

    path = tmp_path / "exp.yaml"
    save_config(lm_experiment(lm_corpus, total_steps=3), path)
    with pytest.raises(TypeError, match="load_config"):  # the env reads no files: the caller loads YAML
        DataMixingEnv(str(path), backend="lm", device="cpu")
    env = DataMixingEnv(load_config(path), backend="lm", device="cpu")
    env.reset(seed=0)
    assert env.step(np.ones(3, dtype=np.float32))[4]["signals"].step == 1
    env.close()
