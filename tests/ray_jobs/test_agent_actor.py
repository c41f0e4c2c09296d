"""The learner actor and rank 0's acting copy: the learner sees every transition once and in order (so
its state equals the in-process mixer's), acting never waits for an update, a dead learner comes back
from the last checkpoint with the transitions since."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import AgentConfig, Transition, build_mixer
from ray_jobs.agent_actor import ActingMixer, Learner, LearnerSpec
from tests.agents.test_ac_odm import _same_state
from tests.ray_jobs.ray_helpers import make_slow_ac_odm

K, S = 4, 6
OBS_SPACE = spaces.Box(-5.0, 5.0, shape=(S,), dtype=np.float32)
ACT_SPACE = spaces.Box(0.0, 1.0, shape=(K,), dtype=np.float32)
CFG = AgentConfig(hidden_width=16, num_hidden_layers=2, batch_size=4, warmup_fraction=0.1, actor_lr=1e-3)
KWARGS = {"seed": 7, "domain_names": [f"d{i}" for i in range(K)], "total_steps": 40}


@pytest.fixture()
def one_torch_thread():
    """The learner runs torch on 1 thread; match it here so float reductions are identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(**extra: Any) -> LearnerSpec:
    return LearnerSpec(CFG, OBS_SPACE, ACT_SPACE, mixer_kwargs=KWARGS, num_threads=1, **extra)


def _transitions(num: int, seed: int = 123) -> list[Transition]:
    """A fixed stream (the actions in it do not depend on any policy, so every path sees the same)."""
    rng = np.random.default_rng(seed)
    obs = [rng.normal(size=S).astype(np.float32) for _ in range(num + 1)]
    return [
        Transition(obs[t], rng.dirichlet(np.ones(K)), 0.0, rng.normal(size=K), obs[t + 1], loss_K=rng.uniform(2, 4, K))
        for t in range(num)
    ]


def _local_state(transitions: list[Transition]) -> dict[str, Any]:
    mixer = build_mixer(CFG, OBS_SPACE, ACT_SPACE, **KWARGS)
    for transition in transitions:
        mixer.observe(transition)
        mixer.update()
    return mixer.state_dict()


# -- the learner in this process (its class is plain Python) -----------------------------------------------
def test_learner_takes_transitions_in_order_and_publishes_its_policy(one_torch_thread) -> None:
    stream = _transitions(12)
    learner = Learner(CFG, OBS_SPACE, ACT_SPACE, KWARGS)
    assert learner.next_policy(0, timeout_s=0.05) is None  # nothing learned yet: no publication
    for number in (1, 0, *range(2, 12)):  # out of order: it waits for transition 0
        learner.submit(stream[number], number)
    _same_state(learner.state_dict(12), _local_state(stream))  # after transition 11 was learned from
    reply = learner.next_policy(0)
    assert reply is not None and reply["learned"] == 12 and reply["version"] >= 1
    expected = build_mixer(CFG, OBS_SPACE, ACT_SPACE, **KWARGS)
    expected.load_state_dict(learner.state_dict(12))
    for name, tensor in expected.policy.state_dict().items():
        assert torch.equal(torch.tensor(reply["policy"][name]), tensor), name
    assert "agent/critic_loss" in reply["metrics"]
    assert learner.next_policy(reply["version"], timeout_s=0.05) is None  # nothing newer


def test_a_failed_update_surfaces_to_the_caller() -> None:
    learner = Learner(CFG, OBS_SPACE, ACT_SPACE, KWARGS)
    bad = Transition(np.zeros(S + 1, np.float32), np.full(K, 0.25), 0.0, np.zeros(K), np.zeros(S, np.float32))
    learner.submit(bad, 0)
    with pytest.raises(RuntimeError, match="agent learner failed.*obs must have shape"):
        learner.next_policy(0, timeout_s=30)
    with pytest.raises(RuntimeError, match="agent learner failed"):
        learner.submit(_transitions(1)[0], 1)


def test_a_mixer_without_a_policy_network_is_refused() -> None:
    with pytest.raises(ValueError, match="'greedy' has no policy network"):
        Learner(CFG.model_copy(update={"kind": "greedy"}), OBS_SPACE, ACT_SPACE, KWARGS)


# -- the pair under Ray ---------------------------------------------------------------------------------------
def test_acting_mixer_learns_every_transition_once_and_recovers_a_killed_learner(ray_session, one_torch_thread) -> None:
    import ray

    stream = _transitions(30)
    mixer = ActingMixer(_spec())
    try:
        obs = stream[0].obs
        for transition in stream[:10]:
            mixer.act(obs)
            mixer.observe(transition)
        checkpoint = mixer.state_dict()  # a checkpoint: the learner has taken all 10
        _same_state(checkpoint, _local_state(stream[:10]))
        for transition in stream[10:20]:
            mixer.act(obs)
            mixer.observe(transition)
        ray.kill(mixer.learner, no_restart=True)
        for transition in stream[20:]:  # act keeps answering from the policy it has
            weights = mixer.act(obs)
            assert weights.shape == (K,) and abs(float(weights.sum()) - 1) < 1e-5
            mixer.observe(transition)
        # the new learner: the checkpoint, then transitions 10..29 resubmitted: each learned exactly once
        _same_state(mixer.state_dict(), _local_state(stream))
        assert mixer.restarts == 1 and mixer.update()["agent/restarts"] == 1.0
    finally:
        mixer.close()


def test_acting_copy_restored_from_a_state_acts_like_the_in_process_mixer(ray_session, one_torch_thread) -> None:
    stream = _transitions(8)
    state = _local_state(stream)
    local = build_mixer(CFG, OBS_SPACE, ACT_SPACE, **KWARGS)
    local.load_state_dict(state)
    mixer = ActingMixer(_spec())
    try:
        mixer.load_state_dict(state)
        for transition in _transitions(3, seed=5):
            np.testing.assert_array_equal(mixer.act(transition.obs), local.act(transition.obs))
        policy = mixer.state_dict()
        _same_state(policy, state)
    finally:
        mixer.close()


def test_acting_never_waits_for_a_slow_update(ray_session) -> None:
    # every gradient step of the learner sleeps 1 s; 10 decisions must not wait for them
    spec = _spec(mixer_factory=lambda *a, **kw: make_slow_ac_odm(*a, step_sleep_s=1.0, **kw))
    mixer = ActingMixer(spec)
    try:
        stream = _transitions(10)
        start = time.monotonic()
        for transition in stream:
            mixer.act(transition.obs)
            mixer.observe(transition)
        elapsed = time.monotonic() - start
        assert elapsed < 5.0, f"10 decisions took {elapsed:.1f} s: acting waited for the 1 s updates"
        deadline, metrics = time.monotonic() + 60, {}
        while not metrics and time.monotonic() < deadline:  # an act after the first update takes its policy
            time.sleep(0.2)
            mixer.act(stream[0].obs)
            metrics = mixer.update()
        assert "agent/critic_loss" in metrics and metrics["agent/policy_lag"] >= 1
    finally:
        mixer.close()
