"""AgentActor / RemoteMixer: same outputs as the local mixer, updates off the caller's path, recovery
from a state dict after the actor dies."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from gymnasium import spaces

from ray_jobs.agent_actor import (
    AgentActor,
    AgentActorDiedError,
    AgentActorSpec,
    AgentUpdateError,
    LocalActingMixer,
    RemoteMixer,
)
from tests.ray_jobs.ray_helpers import LinearTestMixer, make_linear_mixer, make_slow_ac_odm

K, S = 4, 6
OBS_SPACE = spaces.Box(-np.inf, np.inf, shape=(S,), dtype=np.float32)
ACT_SPACE = spaces.Box(0.0, 1.0, shape=(K,), dtype=np.float32)
NAMES = [f"d{i}" for i in range(K)]


def _kwargs(**extra):
    return {"seed": 7, "domain_names": NAMES, **extra}


def _local(**extra) -> LinearTestMixer:
    return make_linear_mixer(None, OBS_SPACE, ACT_SPACE, **_kwargs(**extra))


def _actor(**extra) -> AgentActor:
    auto = extra.pop("auto_update", True)
    return AgentActor(
        None, OBS_SPACE, ACT_SPACE, mixer_factory=make_linear_mixer, auto_update=auto, **_kwargs(**extra)
    )


def _spec(**extra) -> AgentActorSpec:
    return AgentActorSpec(
        None, OBS_SPACE, ACT_SPACE, mixer_kwargs=_kwargs(**extra), mixer_factory=make_linear_mixer
    )


def _trajectory(num_steps: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(123)
    return [(rng.normal(size=S).astype(np.float32), float(rng.normal())) for _ in range(num_steps + 1)]


def _run_local(num_steps: int) -> tuple[list[np.ndarray], list[dict]]:
    mixer, traj = _local(), _trajectory(num_steps)
    weights, metrics = [], []
    for t in range(num_steps):
        obs, reward = traj[t]
        w = mixer.act(obs, explore=True)
        mixer.observe(obs, w, reward, traj[t + 1][0], {})
        metrics.append(mixer.update())
        weights.append(w)
    return weights, metrics


# ----------------------------------------------------------------------------- in-process (no Ray)
def test_sync_mode_matches_local_mixer_exactly() -> None:
    expected_w, expected_m = _run_local(12)
    actor, traj = _actor(auto_update=False), _trajectory(12)
    for t in range(12):
        obs, reward = traj[t]
        w = actor.act(obs, True)
        actor.observe(obs, w, reward, traj[t + 1][0], {})
        assert actor.update() == expected_m[t]
        np.testing.assert_array_equal(w, expected_w[t])
    actor.close()


def test_auto_mode_with_drain_matches_local_mixer_exactly() -> None:
    expected_w, expected_m = _run_local(12)
    actor, traj = _actor(), _trajectory(12)
    for t in range(12):
        obs, reward = traj[t]
        w = actor.act(obs, True)
        actor.observe(obs, w, reward, traj[t + 1][0], {})
        assert actor.drain() == t + 1
        assert actor.poll_metrics() == expected_m[t]
        np.testing.assert_array_equal(w, expected_w[t])
    assert actor.poll_metrics() == {}  # nothing new since the last poll
    actor.close()


def test_act_after_observe_does_not_wait_for_the_update() -> None:
    # a long update (2 s) against a bound of half of it: robust to a loaded machine's scheduling noise
    actor, traj = _actor(update_sleep_s=2.0), _trajectory(2)
    obs, reward = traj[0]
    w = actor.act(obs, True)
    start = time.monotonic()
    actor.observe(obs, w, reward, traj[1][0], {})
    actor.act(traj[1][0], True)  # the update is released only now
    assert time.monotonic() - start < 1.0
    assert actor.stats()["pending"] == 1
    assert actor.drain() == 1
    assert actor.stats()["update_s"] >= 2.0
    actor.close()


def test_act_waits_for_at_most_the_update_in_flight() -> None:
    actor, traj = _actor(update_sleep_s=1.5), _trajectory(4)
    for t in range(3):  # three transitions, no act in between: a backlog of 4.5 s of updates
        actor.observe(traj[t][0], np.full(K, 1 / K), traj[t][1], traj[t + 1][0], {})
    time.sleep(0.05)  # let the update thread start the first released update
    start = time.monotonic()
    actor.act(traj[3][0], True)
    assert time.monotonic() - start < 3.0  # at most the 1.5 s update in flight, never the 4.5 s backlog
    assert actor.stats()["pending"] >= 1  # the act did not wait for the backlog
    assert actor.drain() == 3
    actor.close()


def test_background_update_error_surfaces_to_the_caller() -> None:
    actor, traj = _actor(fail_at_update=1), _trajectory(2)
    obs, reward = traj[0]
    actor.observe(obs, actor.act(obs, True), reward, traj[1][0], {})
    with pytest.raises(AgentUpdateError, match="update 1 failed on purpose"):
        actor.drain()
    with pytest.raises(AgentUpdateError):
        actor.act(obs, True)
    actor.close()


def test_state_dict_drains_queued_updates_first() -> None:
    actor, traj = _actor(update_sleep_s=0.05), _trajectory(3)
    for t in range(3):
        actor.observe(traj[t][0], np.full(K, 1 / K), traj[t][1], traj[t + 1][0], {})
    assert actor.state_dict()["num_updates"] == 3
    actor.close()


def test_spec_actor_options() -> None:
    opts = AgentActorSpec(None, OBS_SPACE, ACT_SPACE, resources={"CPU": 0.5, "GPU": 0.1}).actor_options()
    assert opts == {"num_cpus": 0.5, "num_gpus": 0.1, "max_restarts": 0, "max_concurrency": 1}
    with pytest.raises(ValueError, match="ray.agent_resources"):
        AgentActorSpec(None, OBS_SPACE, ACT_SPACE, resources={"CPU": -1}).actor_options()


# ----------------------------------------------------------------------------- as a Ray actor
@pytest.mark.slow
@pytest.mark.ray
def test_remote_mixer_matches_local_mixer_with_drain(ray_session) -> None:
    expected_w, expected_m = _run_local(10)
    remote, traj = RemoteMixer(_spec()), _trajectory(10)
    try:
        for t in range(10):
            obs, reward = traj[t]
            w = remote.act(obs, explore=True)
            remote.observe(obs, w, reward, traj[t + 1][0], {})
            remote.drain()
            assert remote.update() == expected_m[t]  # metrics of the update that just finished
            np.testing.assert_array_equal(w, expected_w[t])
        assert remote.stats()["updates_done"] == 10
    finally:
        remote.close()


@pytest.mark.slow
@pytest.mark.ray
def test_observe_and_act_do_not_block_on_a_slow_update(ray_session) -> None:
    # The update is made long (2 s) so that "waited for it" and "did not" differ by far more than the
    # scheduling noise of a loaded 2-core machine: the bound below is half an update.
    update_s, lm_step_s, steps = 2.0, 2.2, 3
    remote, traj = RemoteMixer(_spec(update_sleep_s=update_s)), _trajectory(steps)
    try:
        remote.act(traj[0][0])  # warm the actor up (first call imports, builds)
        caller_s = []
        for t in range(steps):
            start = time.monotonic()
            obs, reward = traj[t]
            w = remote.act(obs)
            remote.observe(obs, w, reward, traj[t + 1][0], {})
            caller_s.append(time.monotonic() - start)
            time.sleep(lm_step_s)  # the LM step, during which the agent updates
        remote.act(traj[steps][0])
        assert remote.drain() == steps
        # an update takes 2 s; the caller's act+observe never waited for one
        assert max(caller_s) < update_s / 2, caller_s
        assert remote.stats()["update_s"] >= steps * update_s
    finally:
        remote.close()


@pytest.mark.slow
@pytest.mark.ray
def test_update_returns_the_metrics_act_brought_back_without_calling_the_actor(ray_session) -> None:
    import ray

    traj = _trajectory(3)
    local = _local()  # the actor's order: update 1 is released by act 1 and runs after it
    local.act(traj[0][0])
    local.observe(traj[0][0], np.full(K, 1 / K), traj[0][1], traj[1][0], {})
    local.act(traj[1][0])
    expected = local.update()
    remote = RemoteMixer(_spec())
    try:
        remote.act(traj[0][0])
        remote.observe(traj[0][0], np.full(K, 1 / K), traj[0][1], traj[1][0], {})
        remote.act(traj[1][0])
        assert remote.update() == {}  # update 1 had not finished when act 1 was answered
        deadline = time.monotonic() + 30
        while remote.stats()["updates_done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        remote.act(traj[2][0])  # one round trip: the mixture and the finished update's metrics
        ray.kill(remote.handle, no_restart=True)
        assert remote.update() == expected  # served from what act brought back: the actor is dead
        assert remote.update() == {}  # returned once
    finally:
        remote.close()


@pytest.mark.slow
@pytest.mark.ray
def test_killed_actor_recreated_from_state_gives_the_same_next_action(ray_session) -> None:
    import ray

    remote, traj = RemoteMixer(_spec()), _trajectory(6)
    try:
        for t in range(5):
            obs, reward = traj[t]
            remote.observe(obs, remote.act(obs), reward, traj[t + 1][0], {})
        state = remote.state_dict()
        assert state["num_updates"] == 5
        reference = _local()
        reference.load_state_dict(state)
        expected = reference.act(traj[5][0], explore=True)

        ray.kill(remote.handle)  # asynchronous: calls may still be answered until the kill lands
        deadline = time.monotonic() + 60
        with pytest.raises(AgentActorDiedError):
            while time.monotonic() < deadline:
                remote.act(traj[5][0])
                time.sleep(0.1)
        remote.restart(state)
        np.testing.assert_array_equal(remote.act(traj[5][0]), expected)
    finally:
        remote.close()


@pytest.mark.slow
@pytest.mark.ray
def test_remote_mixer_travels_to_a_worker(ray_session) -> None:
    """As through ``train_loop_config``: a worker uses the driver's actor through a pickled RemoteMixer."""
    import ray

    from agents.base import Mixer

    remote = RemoteMixer(_spec())
    assert isinstance(remote, Mixer) and remote.domain_names == NAMES
    restored = pickle.loads(pickle.dumps(remote))
    assert restored.handle == remote.handle

    @ray.remote(num_cpus=0)
    def act_in_worker(mixer: RemoteMixer, obs: np.ndarray) -> np.ndarray:
        return mixer.act(obs)

    try:
        local, obs = _local(), _trajectory(1)[0][0]
        first = ray.get(act_in_worker.remote(remote, obs))
        np.testing.assert_array_equal(first, local.act(obs))
        np.testing.assert_array_equal(remote.act(obs), local.act(obs))  # same actor, RNG advanced once
    finally:
        remote.close()


# ----------------------------------------------------------------------------- the real AC-ODM mixer
def _ac_odm_setup():
    from agents.config import AgentConfig

    cfg = AgentConfig(kind="ac_odm", hidden_width=16, num_hidden_layers=1, batch_size=4, warmup_fraction=0.2)
    kwargs = {"seed": 3, "domain_names": NAMES, "total_steps": 10, "floor": 0.01}
    return cfg, kwargs


def _ac_odm_info(weights: np.ndarray, t: int) -> dict:
    rng = np.random.default_rng(1000 + t)
    return {"weights_K": weights, "reward_parts_K": rng.normal(size=K), "loss_K": rng.uniform(2, 4, size=K)}


@pytest.fixture
def one_torch_thread():
    """The actor runs torch on 1 thread; match it here so float reductions are identical."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.ray
def test_remote_ac_odm_matches_local_and_recovers_from_a_kill(ray_session, one_torch_thread) -> None:
    import ray

    from agents.base import build_mixer

    cfg, kwargs = _ac_odm_setup()
    local = build_mixer(cfg, OBS_SPACE, ACT_SPACE, **kwargs)
    remote = RemoteMixer(AgentActorSpec(cfg, OBS_SPACE, ACT_SPACE, mixer_kwargs=kwargs))  # agents.build_mixer
    traj, seen = _trajectory(8), set()
    try:
        for t in range(6):  # 2 warmup decisions (ODM teacher), then the actor with exploration noise
            obs, reward = traj[t]
            w_local, w_remote = local.act(obs, explore=True), remote.act(obs, explore=True)
            np.testing.assert_array_equal(w_remote, w_local)
            info = _ac_odm_info(w_local, t)
            local.observe(obs, w_local, reward, traj[t + 1][0], info)
            remote.observe(obs, w_remote, reward, traj[t + 1][0], info)
            remote.drain()
            metrics = local.update()
            assert remote.update() == metrics
            seen.update(metrics)
        assert {"agent/critic_loss", "agent/actor_loss"} <= seen  # real gradient updates ran
        state = remote.state_dict()
        ray.kill(remote.handle)
        remote.restart(state)
        np.testing.assert_array_equal(remote.act(traj[6][0]), local.act(traj[6][0]))
    finally:
        remote.close()


# ----------------------------------------------------------------------------- overlapped act (AC-ODM)
def _slow_ac_odm_actor(step_sleep_s: float, **actor_kwargs) -> AgentActor:
    cfg, kwargs = _ac_odm_setup()
    cfg = cfg.model_copy(update={"warmup_fraction": 0.0})
    return AgentActor(
        cfg,
        OBS_SPACE,
        ACT_SPACE,
        mixer_factory=make_slow_ac_odm,
        step_sleep_s=step_sleep_s,
        num_threads=1,
        **actor_kwargs,
        **kwargs,
    )


def _loop_with_short_lm_steps(actor, steps: int, lm_step_s: float) -> list[float]:
    """The train loop's pattern, act(t) then observe(t), with LM steps much shorter than an update;
    returns the caller's seconds per step (what the LM waits for)."""
    traj, caller_s = _trajectory(steps), []
    for t in range(steps):
        obs, reward = traj[t]
        start = time.monotonic()
        w = actor.act(obs)
        actor.observe(obs, w, reward, traj[t + 1][0], _ac_odm_info(w, t))
        caller_s.append(time.monotonic() - start)
        time.sleep(lm_step_s)
    return caller_s


def test_overlapped_act_never_waits_for_a_slow_ac_odm_update() -> None:
    # each update takes >= 1.5 s, each LM step 0.05 s: the agent falls ever further behind, and the
    # caller still never waits (bound: a third of one update, far above scheduling noise)
    update_s = 1.5
    actor = _slow_ac_odm_actor(update_s)
    try:
        caller_s = _loop_with_short_lm_steps(actor, steps=4, lm_step_s=0.05)
        stats = actor.stats()
        assert stats["overlapped"] == 1.0
        assert max(caller_s) < update_s / 3, caller_s
        assert stats["max_policy_lag"] >= 2  # acts were answered while updates were still owed
        assert stats["updates_done"] < 4
        assert actor.drain() == 4  # every transition is still learned from
        assert actor.stats()["update_s"] >= 4 * update_s
    finally:
        actor.close()


def test_ordered_mode_waits_for_the_update_in_flight() -> None:
    # the same loop with ray.agent_async = false: act waits for the update in flight, so the policy
    # never lags by more than one update (the reproducible schedule)
    update_s = 1.0
    actor = _slow_ac_odm_actor(update_s, overlap_act=False)
    try:
        caller_s = _loop_with_short_lm_steps(actor, steps=3, lm_step_s=0.05)
        stats = actor.stats()
        assert stats["overlapped"] == 0.0
        assert max(caller_s) > update_s / 2, caller_s
        assert stats["max_policy_lag"] <= 1
        assert actor.drain() == 3
    finally:
        actor.close()


@pytest.mark.slow
@pytest.mark.ray
def _slow_ac_odm_spec(update_s: float) -> AgentActorSpec:
    """An actor spec for the real AC-ODM mixer whose every update takes at least ``update_s``."""
    cfg, kwargs = _ac_odm_setup()
    cfg = cfg.model_copy(update={"warmup_fraction": 0.0})
    return AgentActorSpec(
        cfg, OBS_SPACE, ACT_SPACE, mixer_kwargs={**kwargs, "step_sleep_s": update_s}, mixer_factory=make_slow_ac_odm
    )


def test_remote_ac_odm_act_never_waits_for_a_slow_update(ray_session) -> None:
    update_s = 1.5
    remote = RemoteMixer(_slow_ac_odm_spec(update_s))
    try:
        remote.act(_trajectory(0)[0][0])  # warm the actor up (first call imports torch, builds)
        caller_s = _loop_with_short_lm_steps(remote, steps=4, lm_step_s=0.05)
        assert max(caller_s) < update_s / 3, caller_s
        assert remote.drain() == 4
        stats = remote.stats()
        assert stats["overlapped"] == 1.0 and stats["max_policy_lag"] >= 2
    finally:
        remote.close()


# ----------------------------------------------------------------------------- split acting (AC-ODM)
def test_learn_records_updates_and_returns_only_a_newer_policy() -> None:
    from agents.base import build_mixer

    cfg, kwargs = _ac_odm_setup()
    actor = AgentActor(cfg, OBS_SPACE, ACT_SPACE, auto_update=False, **kwargs)
    acting = build_mixer(cfg, OBS_SPACE, ACT_SPACE, **kwargs)  # the caller's copy
    traj = _trajectory(3)
    try:
        for t in range(3):
            obs = traj[t][0]
            w = acting.act(obs)
            reply = actor.learn(obs, w, 0.0, traj[t + 1][0], _ac_odm_info(w, t), acting.acting_state(), t)
            assert reply["learned"] == t + 1
            assert reply["snapshot"]["version"] == t + 1  # each update publishes one new policy
            assert reply["metrics"]["agent/num_updates"] == t + 1
        stale = actor.learn(obs, w, 0.0, obs, _ac_odm_info(w, 9), acting.acting_state(), since_version=99)
        assert stale["snapshot"] is None  # the caller has it already: nothing crosses
        assert actor.stats()["observed"] == 4 and actor.stats()["updates_done"] == 4
        state = actor.state_dict()
        assert state["explore_rng"] == acting.acting_state()["explore_rng"]  # the whole agent's state
    finally:
        actor.close()


def _split_run(mixer, steps: int, *, drain: bool) -> tuple[list[np.ndarray], list[dict]]:
    traj, weights, metrics = _trajectory(steps), [], []
    for t in range(steps):
        obs, reward = traj[t]
        w = mixer.act(obs, explore=True)
        mixer.observe(obs, w, reward, traj[t + 1][0], _ac_odm_info(w, t))
        if drain:
            mixer.drain()
        metrics.append(mixer.update())
        weights.append(w)
    return weights, metrics


@pytest.mark.slow
@pytest.mark.ray
def test_local_acting_matches_the_in_process_mixer_and_recovers_from_a_kill(ray_session, one_torch_thread) -> None:
    import ray

    from agents.base import build_mixer

    cfg, kwargs = _ac_odm_setup()
    local = build_mixer(cfg, OBS_SPACE, ACT_SPACE, **kwargs)
    split = LocalActingMixer(AgentActorSpec(cfg, OBS_SPACE, ACT_SPACE, mixer_kwargs=kwargs, num_threads=1))
    try:
        # drained after each transition, the copy acts from the policy that learned from it: the
        # in-process schedule, action for action and metric for metric (warmup, then exploration)
        got_w, got_m = _split_run(split, 6, drain=True)
        want_w, want_m = _split_run(local, 6, drain=False)
        for t in range(6):
            np.testing.assert_array_equal(got_w[t], want_w[t], err_msg=f"step {t}")
            assert got_m[t] == want_m[t]
        assert {"agent/critic_loss", "agent/actor_loss"} <= set(got_m[-1])
        stats = split.stats()
        assert stats["local_acting"] == 1.0 and stats["observed"] == 6 and stats["policy_lag"] == 0
        state = split.state_dict()
        assert state["counters"] == local.state_dict()["counters"]
        ray.kill(split.handle)
        split.restart(state)  # the actor and the copy both come back from the state
        obs = _trajectory(8)[7][0]
        np.testing.assert_array_equal(split.act(obs), local.act(obs))
    finally:
        split.close()


@pytest.mark.slow
@pytest.mark.ray
def test_ordered_local_acting_acts_exactly_like_the_ordered_actor(ray_session, one_torch_thread) -> None:
    # ray.agent_async: false, both placements: the policy lags by exactly one update in each, so the
    # runs are identical, and repeatable; without draining anything
    cfg, kwargs = _ac_odm_setup()
    spec = AgentActorSpec(cfg, OBS_SPACE, ACT_SPACE, mixer_kwargs=kwargs, num_threads=1, overlap_act=False)
    split, remote = LocalActingMixer(spec, asynchronous=False), RemoteMixer(spec)
    try:
        split_w, _ = _split_run(split, 9, drain=False)
        remote_w, _ = _split_run(remote, 9, drain=False)
        for t in range(9):
            np.testing.assert_array_equal(split_w[t], remote_w[t], err_msg=f"step {t}")
        assert not np.allclose(split_w[3], split_w[8])  # the policy did move
        assert split.stats()["max_policy_lag"] == 1
    finally:
        split.close()
        remote.close()


@pytest.mark.slow
@pytest.mark.ray
def test_local_acting_never_waits_for_a_slow_update(ray_session) -> None:
    update_s = 1.5
    split = LocalActingMixer(_slow_ac_odm_spec(update_s), asynchronous=True)
    try:
        split.stats()  # the actor is up
        caller_s = _loop_with_short_lm_steps(split, steps=4, lm_step_s=0.05)
        assert max(caller_s) < update_s / 3, caller_s
        assert split.stats()["max_policy_lag"] >= 2  # it acted while transitions were still being learned
        assert split.drain() == 4  # every transition is learned from
        assert split.stats()["policy_lag"] == 0
    finally:
        split.close()


@pytest.mark.slow
@pytest.mark.ray
def test_local_acting_takes_replies_in_the_background_and_surfaces_a_dead_actor(ray_session) -> None:
    import ray

    cfg, kwargs = _ac_odm_setup()
    split = LocalActingMixer(AgentActorSpec(cfg, OBS_SPACE, ACT_SPACE, mixer_kwargs=kwargs), asynchronous=True)
    traj = _trajectory(6)
    try:
        for t in range(3):
            w = split.act(traj[t][0])
            split.observe(traj[t][0], w, 0.0, traj[t + 1][0], _ac_odm_info(w, t))
        deadline = time.monotonic() + 60
        while split.stats()["policy_lag"] > 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # no act, no drain: the reply thread takes the policies in by itself
        assert split.stats()["policy_lag"] == 0 and split.stats()["pending"] == 0
        assert split.replica.policy_version == 3  # one published policy per transition, all loaded
        assert split.update()["agent/num_updates"] == 3
        ray.kill(split.handle)
        w = split.act(traj[3][0])
        split.observe(traj[3][0], w, 0.0, traj[4][0], _ac_odm_info(w, 3))
        with pytest.raises(AgentActorDiedError):
            while time.monotonic() < deadline:  # the dead actor's reply fails in the thread ...
                split.act(traj[4][0])  # ... and the next act raises it (RecoveringMixer restarts)
                time.sleep(0.05)
        split.restart(None)
        w = split.act(traj[4][0])
        split.observe(traj[4][0], w, 0.0, traj[5][0], _ac_odm_info(w, 4))
        assert split.drain() == 5 and split.stats()["observed"] == 1  # a fresh actor learned from it
    finally:
        split.close()
