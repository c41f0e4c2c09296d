"""AC-ODM: the update (against an oracle), targets, warmup, exploration, schedules, determinism,
exact resume, policy files and frozen (proxy) mode."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import ActorCriticMixer, AgentConfig, ExplorationConfig, SmoothedMeanMixer, build_mixer
from agents.ac_odm import _softmax
from agents.base import Transition
from tests.agents.test_known_answer import ComplementaryMixing

torch.set_num_threads(1)
K, S = 4, 7


def make_mixer(
    *, seed: int = 0, k: int = K, s: int = S, total_steps: int = 100, floor: float = 0.0, **overrides: Any
) -> ActorCriticMixer:
    cfg = dict(hidden_width=16, num_hidden_layers=2, batch_size=8, warmup_fraction=0.0, actor_lr=1e-3)
    cfg.update(overrides)
    mixer = build_mixer(
        AgentConfig(**cfg),
        spaces.Box(-5.0, 5.0, (s,), np.float32),
        spaces.Box(0.0, 1.0, (k,), np.float32),
        seed=seed,
        domain_names=[f"d{i}" for i in range(k)],
        total_steps=total_steps,
        floor=floor,
    )
    assert isinstance(mixer, ActorCriticMixer)
    return mixer


def feed(mixer: ActorCriticMixer, num: int, seed: int = 0, update: bool = True) -> list[dict[str, float]]:
    """``num`` decisions against random observations/rewards (a fixed stream per ``seed``)."""
    rng = np.random.default_rng(seed)
    metrics = []
    obs = rng.normal(size=mixer.obs_dim).astype(np.float32)
    for _ in range(num):
        weights_K = mixer.act(obs, explore=True)
        next_obs = rng.normal(size=mixer.obs_dim).astype(np.float32)
        info = {
            "reward_parts_K": rng.normal(size=mixer.num_domains),
            "loss_K": rng.uniform(2, 4, mixer.num_domains),
        }
        mixer.observe(Transition.from_step(obs, weights_K, 0.0, next_obs, info))
        if update:
            metrics.append(mixer.update())
        obs = next_obs
    return metrics


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def all_params(mixer: ActorCriticMixer) -> list[torch.Tensor]:
    return [
        p
        for name in ("actor", "critic", "actor_target", "critic_target")
        for p in params(getattr(mixer.nets, name))
    ]


# -- the update ---------------------------------------------------------------------------------------------
def test_update_changes_actor_and_critic() -> None:
    mixer = make_mixer()
    feed(mixer, 10, update=False)
    actor_before, critic_before = params(mixer.actor), params(mixer.critic)
    mixer.update_credit = 1.0
    metrics = mixer.update()
    assert metrics["agent/warmup"] == 0.0 and math.isfinite(metrics["agent/actor_loss"])
    for before, after in zip(actor_before, mixer.actor.parameters(), strict=True):
        assert not torch.equal(before, after)
    for before, after in zip(critic_before, mixer.critic.parameters(), strict=True):
        assert not torch.equal(before, after)


def test_targets_move_by_exactly_tau_and_get_no_gradients() -> None:
    mixer = make_mixer(tau=0.3)
    feed(mixer, 10, update=False)
    for online, target in (("actor", "actor_target"), ("critic", "critic_target")):
        torch.testing.assert_close(
            params(getattr(mixer.nets, online)), params(getattr(mixer.nets, target)), rtol=0, atol=0
        )
    targets_before = {n: params(getattr(mixer.nets, n)) for n in ("actor_target", "critic_target")}
    mixer.update_credit = 1.0
    mixer.update()
    for online, target in (("actor", "actor_target"), ("critic", "critic_target")):
        for old, new, now in zip(
            targets_before[target],
            getattr(mixer.nets, target).parameters(),
            getattr(mixer.nets, online).parameters(),
            strict=True,
        ):
            assert not new.requires_grad and new.grad is None
            assert not torch.equal(old, new)
            torch.testing.assert_close(new, old + 0.3 * (now.detach() - old), rtol=1e-6, atol=1e-8)


def test_td_target_and_losses_match_a_hand_computation() -> None:
    mixer = make_mixer(gamma=0.9, tau=0.5)
    feed(mixer, 20)  # targets now differ from the online networks
    before = copy.deepcopy(mixer)
    batch = copy.deepcopy(mixer.replay_buffer).sample(8)  # the same draw the update will make
    obs_BS, weights_BK, rewards_BK, next_obs_BS = (torch.as_tensor(x) for x in batch)
    with torch.no_grad():
        next_q_BK = before.nets.critic_target(next_obs_BS, before.nets.actor_target(next_obs_BS))[0]
        target_q_BK = rewards_BK + 0.9 * next_q_BK
        critic_loss = ((before.critic(obs_BS, weights_BK)[0] - target_q_BK) ** 2).mean()
    mixer.update_credit = 1.0
    metrics = mixer.update()
    assert metrics["agent/critic_loss"] == pytest.approx(critic_loss.item(), rel=1e-5)
    assert metrics["agent/target_q_mean"] == pytest.approx(target_q_BK.mean().item(), rel=1e-5)
    with torch.no_grad():
        # actor loss: minus the summed heads of the stepped critic at the old actor's mixture, plus
        # entropy_coef (default 1) times the KL to the prior (the teacher's mixture: uniform here,
        # since the greedy teacher saw no Gram matrix)
        pi_BK = before.actor(obs_BS)
        kl = (pi_BK * (pi_BK.log() - math.log(1.0 / K))).sum(-1).mean()
        actor_loss = -mixer.critic.q1(obs_BS, pi_BK).sum(-1).mean() + 1.0 * kl
    assert metrics["agent/kl_to_prior"] == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["agent/actor_loss"] == pytest.approx(actor_loss.item(), rel=1e-5)


def test_td3_twin_critics_take_the_min_and_delay_the_actor() -> None:
    mixer = make_mixer(num_critics=2, policy_delay=2, target_noise=0.0)
    feed(mixer, 10, update=False)
    assert len(mixer.critic.q_nets) == 2
    before = copy.deepcopy(mixer)
    batch = copy.deepcopy(mixer.replay_buffer).sample(8)
    _, _, rewards_BK, next_obs_BS = (torch.as_tensor(x) for x in batch)
    with torch.no_grad():
        next_q_CBK = before.nets.critic_target(next_obs_BS, before.nets.actor_target(next_obs_BS))
        target_q_BK = rewards_BK + mixer.config.gamma * torch.minimum(next_q_CBK[0], next_q_CBK[1])
    mixer.update_credit = 1.0
    assert mixer.update()["agent/target_q_mean"] == pytest.approx(target_q_BK.mean().item(), rel=1e-5)
    actor_after_first = params(mixer.actor)
    targets_after_first = params(mixer.nets.critic_target)
    mixer.update_credit = 1.0
    metrics = mixer.update()  # second update: critic only
    assert math.isnan(metrics["agent/actor_loss"])
    torch.testing.assert_close(params(mixer.actor), actor_after_first, rtol=0, atol=0)
    torch.testing.assert_close(params(mixer.nets.critic_target), targets_after_first, rtol=0, atol=0)


def test_td3_target_noise_is_seeded_and_used() -> None:
    noisy = [feed(make_mixer(num_critics=2, target_noise=0.3), 15) for _ in range(2)]
    np.testing.assert_equal(noisy[0], noisy[1])
    plain = feed(make_mixer(num_critics=2, target_noise=0.0), 15)
    assert plain[-1]["agent/target_q_mean"] != noisy[0][-1]["agent/target_q_mean"]


# -- warmup -------------------------------------------------------------------------------------------------
def test_warmup_follows_the_odm_teacher_then_copies_targets() -> None:
    mixer = make_mixer(warmup_fraction=0.2, total_steps=100, tau=0.2, warmup_teacher="odm")  # 20 warmup decisions
    teacher = SmoothedMeanMixer(
        AgentConfig(kind="smoothed_mean"),
        spaces.Box(-5.0, 5.0, (S,), np.float32),
        spaces.Box(0.0, 1.0, (K,), np.float32),
        seed=0,
        domain_names=mixer.domain_names,
        total_steps=100,
    )
    rng = np.random.default_rng(0)
    obs = np.zeros(S, np.float32)
    targets_init = params(mixer.nets.actor_target)
    for _ in range(20):
        weights_K = mixer.act(obs, explore=True)
        np.testing.assert_allclose(weights_K, teacher.act(obs), rtol=1e-6)
        info = {"reward_parts_K": rng.normal(size=K), "loss_K": rng.uniform(2, 5, K)}
        mixer.observe(Transition.from_step(obs, weights_K, 0.0, obs, info))
        teacher.observe(Transition.from_step(obs, weights_K, 0.0, obs, info))
        assert mixer.update()["agent/warmup"] == 1.0
    torch.testing.assert_close(
        params(mixer.nets.actor_target), targets_init, rtol=0, atol=0
    )  # untouched in warmup
    assert not mixer.in_warmup and not mixer.targets_synced
    online_at_end = params(mixer.actor)
    feed(mixer, 1)  # first main-phase update: hard copy, then Polyak
    assert mixer.targets_synced
    for old, new, now in zip(
        online_at_end, mixer.nets.actor_target.parameters(), mixer.actor.parameters(), strict=True
    ):
        torch.testing.assert_close(new, old + 0.2 * (now.detach() - old), rtol=1e-6, atol=1e-8)


def test_warmup_behaviour_clones_the_teacher() -> None:
    mixer = make_mixer(warmup_fraction=0.5, total_steps=400, actor_lr=3e-3, warmup_teacher="odm")
    rng = np.random.default_rng(0)
    obs = np.zeros(S, np.float32)

    def actor_K() -> np.ndarray:
        with torch.no_grad():
            return mixer.actor(torch.as_tensor(obs)[None])[0].numpy()

    initial_K = actor_K()
    loss_K = np.array([2.0, 2.5, 3.0, 4.0])
    for _ in range(200):
        mixer.observe(Transition.from_step(obs, mixer.act(obs), 0.0, obs, {"reward_parts_K": rng.normal(size=K), "loss_K": loss_K}))
        mixer.update()
    teacher_K = mixer.teacher.act(obs)
    # With one observation the clone's MSE target is an average of the teacher's stored (drifting) mixtures.
    stored_K = mixer.replay_buffer.weights_NK[: len(mixer.replay_buffer)].mean(axis=0)
    assert np.abs(initial_K - stored_K).max() > 0.1
    assert np.abs(actor_K() - stored_K).max() < 0.03
    np.testing.assert_array_equal(np.argsort(actor_K()), np.argsort(teacher_K))


def test_reference_warmup_critic_target_is_one_plus_gamma_times_reward() -> None:
    mixer = make_mixer(warmup_fraction=0.5, warmup_critic_target="reference", gamma=0.8)
    feed(mixer, 5, update=False)
    rewards_BK = copy.deepcopy(mixer.replay_buffer).sample(8).rewards_BK
    mixer.update_credit = 1.0
    assert mixer.update()["agent/target_q_mean"] == pytest.approx(1.8 * rewards_BK.mean(), rel=1e-5)


# -- acting, exploration, schedules, credit --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["logit_gaussian", "dirichlet", "none"])
def test_actions_are_on_the_simplex_with_the_floor(kind: str) -> None:
    mixer = make_mixer(floor=0.05, exploration=ExplorationConfig(kind=kind, scale=2.0, min_scale=0.0))
    rng = np.random.default_rng(0)
    for explore in (True, False):
        for _ in range(30):
            weights_K = mixer.act(rng.normal(size=S).astype(np.float32), explore=explore)
            assert weights_K.dtype == np.float32 and abs(float(weights_K.sum()) - 1.0) < 1e-6
            assert weights_K.min() >= np.float32(0.05)


def test_exploration_noise_decays_per_decision_after_warmup() -> None:
    exploration = ExplorationConfig(scale=0.5, decay=0.9, min_scale=0.2)
    mixer = make_mixer(exploration=exploration, warmup_fraction=0.1, total_steps=20)  # 2 warm-up decisions
    obs = np.zeros(S, np.float32)
    feed(mixer, 2, update=False)
    assert mixer.exploration_scale == 0.5
    greedy = mixer.act(obs, explore=False)
    noisy = []
    for _ in range(3):
        noisy.append(mixer.act(obs, explore=True))
        feed(mixer, 1, update=False)
    assert all(not np.allclose(w, greedy) for w in noisy)
    assert not np.array_equal(noisy[0], noisy[1])  # a new draw per decision
    assert mixer.exploration_scale == pytest.approx(0.5 * 0.9**3)
    feed(mixer, 20, update=False)
    assert mixer.exploration_scale == 0.2


def test_cosine_schedule_per_network() -> None:
    mixer = make_mixer(lr_schedule="cosine", min_lr_ratio=0.1, total_steps=20, actor_lr=1e-3, critic_lr=2e-3)
    metrics = feed(mixer, 20)
    for i, m in enumerate(metrics):  # update i runs at progress i / 20 of the post-warmup updates
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 20))
        assert m["agent/actor_lr"] == pytest.approx(1e-3 * factor)
        assert m["agent/critic_lr"] == pytest.approx(2e-3 * factor)
    constant = feed(make_mixer(total_steps=20), 5)
    assert {m["agent/actor_lr"] for m in constant} == {1e-3}


@pytest.mark.parametrize(("ratio", "expected"), [(0.5, [0, 1, 0, 1, 0, 1]), (2.0, [2, 2, 2, 2, 2, 2])])
def test_updates_per_step(ratio: float, expected: list[int]) -> None:
    mixer = make_mixer(updates_per_step=ratio)
    done = []
    for _ in range(6):
        before = mixer.num_updates
        feed(mixer, 1, update=False)
        mixer.update()
        done.append(mixer.num_updates - before)
    assert done == expected


def test_invalid_transitions_are_dropped() -> None:
    mixer = make_mixer()
    obs = np.zeros(S, np.float32)
    weights_K = mixer.act(obs)
    mixer.observe(Transition.from_step(obs, weights_K, 0.0, obs, {"reward_parts_K": np.zeros(K), "reward_valid": False}))
    mixer.observe(Transition.from_step(obs, weights_K, 0.0, obs, {"reward_parts_K": np.array([1.0, np.nan, 0.0, 0.0])}))
    assert len(mixer.replay_buffer) == 0 and mixer.num_skipped == 2 and mixer.update() == {}
    mixer.observe(Transition.from_step(obs, weights_K, 0.0, obs, {}))  # no reward at all: invalid
    assert mixer.num_skipped == 3 and len(mixer.replay_buffer) == 0
    with pytest.raises(ValueError, match=r"transition.reward_K must have shape \(4,\)"):
        mixer.observe(Transition(obs, weights_K, 0.0, np.zeros(3), obs))
    # The env's applied mixture (info["weights_K"]) is what the buffer stores.
    applied_K = np.array([0.1, 0.2, 0.3, 0.4])
    mixer.observe(Transition.from_step(obs, weights_K, 0.0, obs, {"reward_parts_K": np.zeros(K), "weights_K": applied_K}))
    np.testing.assert_allclose(mixer.replay_buffer.weights_NK[0], applied_K.astype(np.float32))


# -- determinism and exact resume ------------------------------------------------------------------------------
def run_env(
    mixer: ActorCriticMixer, env: ComplementaryMixing, obs: np.ndarray, num: int
) -> tuple[list, list, np.ndarray]:
    weights, metrics = [], []
    for _ in range(num):
        weights_K = mixer.act(obs, explore=True)
        next_obs, reward, info = env.step(weights_K)
        mixer.observe(Transition.from_step(obs, weights_K, reward, next_obs, info))
        weights.append(weights_K)
        metrics.append(mixer.update())
        obs = next_obs
    return weights, metrics, obs


def _bandit_mixer(seed: int, env: ComplementaryMixing, **overrides: Any) -> ActorCriticMixer:
    return make_mixer(seed=seed, k=env.num_domains, s=env.num_domains + 1, warmup_fraction=0.2, **overrides)


def test_two_seeded_runs_are_identical_and_seeds_matter() -> None:
    runs = []
    for seed in (3, 3, 4):
        env = ComplementaryMixing(total_steps=100, seed=0)
        weights, metrics, _ = run_env(_bandit_mixer(seed, env), env, env.reset(), 40)
        runs.append((np.array(weights), metrics))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0][-10:], runs[2][0][-10:])


@pytest.mark.parametrize("overrides", [{}, {"num_critics": 2, "target_noise": 0.2, "policy_delay": 2}])
def test_state_dict_round_trip_reproduces_the_next_20_actions_and_updates(
    overrides: dict[str, Any], tmp_path: Path
) -> None:
    env = ComplementaryMixing(total_steps=100, seed=0)
    mixer = _bandit_mixer(1, env, lr_schedule="cosine", **overrides)
    _, _, obs = run_env(mixer, env, env.reset(), 30)
    blob = io.BytesIO()
    torch.save(mixer.state_dict(), blob)  # saved, then the original keeps running: the state must be a copy
    env_copy = copy.deepcopy(env)
    expected_weights, expected_metrics, _ = run_env(mixer, env, obs, 20)
    blob.seek(0)
    restored = _bandit_mixer(
        99, env_copy, lr_schedule="cosine", **overrides
    )  # another seed: RNG state must load
    restored.load_state_dict(torch.load(blob, weights_only=True))
    weights, metrics, _ = run_env(restored, env_copy, obs, 20)
    np.testing.assert_array_equal(np.array(weights), np.array(expected_weights))
    np.testing.assert_equal(metrics, expected_metrics)  # NaN (delayed actor step) equals NaN


def test_load_state_dict_rejects_another_shape() -> None:
    state = make_mixer().state_dict()
    with pytest.raises(ValueError, match="state is for"):
        make_mixer(k=K + 1).load_state_dict(state)


# -- policy files and frozen (proxy) mode ------------------------------------------------------------------------
def _trained_policy(tmp_path: Path, k: int = K, s: int = S) -> tuple[Path, ActorCriticMixer]:
    online = make_mixer(k=k, s=s)
    feed(online, 20)
    path = tmp_path / "policy" / "policy.pt"
    online.save_policy(path)
    assert [p.name for p in path.parent.iterdir()] == ["policy.pt"]  # atomic: no temp file left
    return path, online


def test_frozen_mode_acts_with_the_loaded_policy_and_never_changes_a_parameter(tmp_path: Path) -> None:
    path, online = _trained_policy(tmp_path)
    # The architecture comes from the file: a different width in the config does not matter.
    frozen = make_mixer(
        mode="frozen", policy=str(path), warmup_fraction=0.1, total_steps=100, hidden_width=64
    )
    snapshot = all_params(frozen)
    torch.testing.assert_close(params(frozen.actor), params(online.actor), rtol=0, atol=0)
    metrics = feed(frozen, 40)
    assert all(m == {} for m in metrics)
    assert len(frozen.replay_buffer) == 0
    torch.testing.assert_close(all_params(frozen), snapshot, rtol=0, atol=0)
    obs = np.linspace(-1, 1, S).astype(np.float32)
    # After warmup the frozen actor drives, without exploration, exactly as the trained actor would.
    np.testing.assert_array_equal(frozen.act(obs, explore=True), online.act(obs, explore=False))


def test_frozen_mode_follows_the_teacher_during_warmup(tmp_path: Path) -> None:
    path, _ = _trained_policy(tmp_path)
    frozen = make_mixer(
        mode="frozen", policy=str(path), warmup_fraction=0.5, total_steps=10, warmup_teacher="odm"
    )
    obs = np.zeros(S, np.float32)
    np.testing.assert_allclose(frozen.act(obs), frozen.teacher.act(obs))
    frozen.observe(Transition.from_step(obs, frozen.act(obs), 0.0, obs, {"loss_K": np.array([1.0, 2.0, 3.0, 9.0])}))
    assert frozen.teacher.num_updates == 1


@pytest.mark.parametrize(
    ("k", "s", "message"),
    [(K + 1, S, r"K=4 domains .* K=5 domains"), (K, S + 2, r"observation size 7, .*observation size 9")],
)
def test_frozen_mode_rejects_a_policy_of_another_shape_naming_both(
    tmp_path: Path, k: int, s: int, message: str
) -> None:
    path, _ = _trained_policy(tmp_path)
    with pytest.raises(ValueError, match=message):
        make_mixer(mode="frozen", policy=str(path), k=k, s=s)


def test_policy_domain_names_must_match(tmp_path: Path) -> None:
    path, _ = _trained_policy(tmp_path)
    other = make_mixer()
    other.domain_names = ["a", "b", "c", "d"]
    with pytest.raises(
        ValueError, match=r"trained on domains \['d0', 'd1', 'd2', 'd3'\].*\['a', 'b', 'c', 'd'\]"
    ):
        other.load_policy(path)


def test_policy_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        make_mixer(mode="frozen", policy=str(missing))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not an acodm policy file"):
        make_mixer(mode="frozen", policy=str(foreign))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.pt.*not a readable acodm policy file") as err:
        make_mixer(mode="frozen", policy=str(garbage))
    assert "weights_only" not in str(err.value)  # never advise loading an untrusted file with pickle


def test_online_mode_with_a_policy_warm_starts_from_it_and_keeps_learning(tmp_path: Path) -> None:
    path, trained = _trained_policy(tmp_path)
    warm = make_mixer(policy=str(path), warmup_fraction=0.5, total_steps=40, hidden_width=64)
    assert warm.warmup_steps == 0 and warm.architecture["hidden_width"] == 16  # the file's architecture
    obs = np.linspace(-1, 1, S).astype(np.float32)
    np.testing.assert_array_equal(warm.act(obs, explore=False), trained.act(obs, explore=False))
    torch.testing.assert_close(params(warm.nets.actor_target), params(trained.actor), rtol=0, atol=0)
    feed(warm, 10)
    assert not np.array_equal(warm.act(obs, explore=False), trained.act(obs, explore=False))  # it learns
    with pytest.raises(ValueError, match=r"K=4 domains .* K=5 domains"):
        make_mixer(policy=str(path), k=K + 1)


def test_load_policy_into_an_online_mixer_resets_its_targets(tmp_path: Path) -> None:
    path, online = _trained_policy(tmp_path)
    fresh = make_mixer(seed=5)
    fresh.load_policy(path)
    torch.testing.assert_close(params(fresh.nets.actor_target), params(online.actor), rtol=0, atol=0)
    torch.testing.assert_close(params(fresh.critic), params(online.critic), rtol=0, atol=0)


# -- concurrency: update on another thread while act/observe run (the Ray agent actor) --------------------
def _greedy(mixer: ActorCriticMixer, obs: np.ndarray) -> np.ndarray:
    """The training actor's noise-free mixture (what act returns once that actor is published)."""
    with torch.no_grad():
        logits_K = mixer.actor.logits(torch.as_tensor(obs)[None])[0].to(torch.float64).numpy()
    return mixer._finish(_softmax(logits_K))  # the same arithmetic as act


def test_copies_and_pickles_of_a_mixer_act_alike_and_learn_on_their_own() -> None:
    import pickle

    mixer = make_mixer()
    feed(mixer, 6)
    obs = np.linspace(-1, 1, S).astype(np.float32)
    for clone in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
        np.testing.assert_array_equal(clone.act(obs, explore=True), mixer.act(obs, explore=True))
        feed(clone, 2, seed=3)  # the copy learns on its own
    np.testing.assert_array_equal(mixer.act(obs, explore=False), _greedy(mixer, obs))


def test_load_state_dict_acts_with_the_loaded_actor() -> None:
    source, target = make_mixer(seed=1), make_mixer(seed=2)
    feed(source, 8)
    obs = np.linspace(-1, 1, S).astype(np.float32)
    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(target.act(obs, explore=False), source.act(obs, explore=False))


# -- the acting copy: observes every transition, loads the learner's policy (the Ray path) -----------------
def _same_state(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality of two state dicts (tensors and arrays exactly)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_a_copy_that_observes_and_loads_the_policy_acts_like_one_mixer() -> None:
    # warmup (the teacher) then exploring actor decisions: the copy never updates, it observes the same
    # transitions and takes the learner's policy.state_dict() after each update
    overrides = dict(warmup_fraction=0.25, updates_per_step=2.0)
    single, learner, copy_ = (make_mixer(seed=4, total_steps=16, **overrides) for _ in range(3))
    rng = np.random.default_rng(8)
    obs = rng.normal(size=S).astype(np.float32)
    for t in range(16):
        weights = copy_.act(obs, explore=True)
        np.testing.assert_array_equal(weights, single.act(obs, explore=True), err_msg=f"step {t}")
        next_obs = rng.normal(size=S).astype(np.float32)
        info = {"reward_parts_K": rng.normal(size=K), "loss_K": rng.uniform(2, 4, K), "weights_K": weights}
        transition = Transition.from_step(obs, weights, 0.0, next_obs, info)
        single.observe(transition)
        expected = single.update()
        learner.observe(transition)
        _same_state(learner.update(), expected, f"metrics at step {t}")
        copy_.observe(transition)
        copy_.policy.load_state_dict(learner.policy.state_dict())
        obs = next_obs
    _same_state(learner.state_dict(), single.state_dict())


def test_act_changes_no_state() -> None:
    mixer = make_mixer(warmup_fraction=0.0)
    feed(mixer, 5)
    before = mixer.state_dict()
    obs = np.linspace(-1, 1, S).astype(np.float32)
    first = mixer.act(obs, explore=True)
    np.testing.assert_array_equal(mixer.act(obs, explore=True), first)  # the same decision draws the same noise
    _same_state(mixer.state_dict(), before)
