"""The agent under Ray: one learner actor, and an acting copy of the mixer on rank 0.

A mixer with a policy network (AC-ODM: ``BaseMixer.policy`` is not None) runs as a pair:

* ``Learner``, a Ray actor, holds the mixer that learns. ``submit`` queues a transition and returns at
  once; one thread of the actor takes the queue in order, calls ``observe`` then ``update`` on the
  mixer, and after each update that trained publishes the policy's state (``policy.state_dict()``),
  numbered. ``next_policy(known)`` answers with the newest publication past ``known``, waiting for one.
  Only that thread touches the mixer (``state_dict``/``load_state_dict`` are queued behind the
  transitions too), so ``agents`` stays single-threaded.
* ``ActingMixer``, on rank 0, is what the run loop calls. It keeps a copy of the mixer that observes
  every transition itself but never updates: ``act`` first checks, without waiting (``ray.wait`` with
  ``timeout=0``), whether the learner's next publication has arrived, loads it into the copy's policy if
  so, and acts from the copy. ``observe`` records the transition on the copy and submits it to the
  learner without waiting. So an LM step never waits for an agent update or a round trip; the policy it
  acts from lags the learner by the updates still in flight (``agent/policy_lag``), which makes a Ray run
  depend on timing. Exact repetition is the in-process path's job.
* ``state_dict`` (at each checkpoint) waits until the learner has taken every transition submitted, and
  is the whole agent: the copy differs from the learner only in its policy, which it reloads.
* If the learner dies (node lost, killed), the next call that meets the dead actor starts a new one from
  the last checkpoint's agent state and resubmits the transitions since then, so the learner sees every
  transition once; ``agent/restarts`` counts it.

Every other mixer (ODM bandits, greedy, static) runs in-process on rank 0: its update is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import ray
import torch

from agents.base import Transition, build_mixer
from ray_jobs.cluster import ray_options

log = logging.getLogger(__name__)

_BACKLOG_WARNING = 16  # transitions the learner may be behind before the run says so
MixerFactory = Callable[..., Any]


class Learner:
    """The learning mixer, updated on a thread of its own (see the module docstring).

    Args:
        agent_cfg, observation_space, action_space, mixer_kwargs: ``agents.build_mixer``'s arguments.
        num_threads: ``torch.set_num_threads`` in this process (None leaves torch's default).
        mixer_factory: builds the mixer from those arguments; None = ``agents.build_mixer``.
    """

    def __init__(
        self,
        agent_cfg: Any,
        observation_space: Any,
        action_space: Any,
        mixer_kwargs: Mapping[str, Any],
        num_threads: int | None = None,
        mixer_factory: MixerFactory | None = None,
    ) -> None:
        if num_threads is not None:
            import torch

            torch.set_num_threads(int(num_threads))
        factory = mixer_factory or build_mixer
        self._mixer = factory(agent_cfg, observation_space, action_space, **dict(mixer_kwargs))
        if self._mixer.policy is None:
            raise ValueError(f"agent.kind = {agent_cfg.kind!r} has no policy network to learn in a Learner")
        self._inbox: queue.Queue[Any] = queue.Queue()
        # A threaded actor may run one caller's calls out of order: transitions carry their number and
        # wait here until every earlier one has arrived.
        self._arrivals = threading.Condition()
        self._early: dict[int, Transition] = {}
        self._next = 0  # number of the next transition to queue
        self._published = threading.Condition()
        self._version = 0  # publications so far
        self._policy: dict[str, Any] | None = None
        self._metrics: dict[str, float] = {}
        self._learned = 0  # transitions observed and updated on
        self._error: BaseException | None = None
        threading.Thread(target=self._work, name="agent-learner", daemon=True).start()

    def submit(self, transition: Transition, number: int) -> None:
        """Queue transition ``number`` (0, 1, ... per learner) for ``observe`` + ``update``, after every
        lower number; returns at once."""
        self._raise_if_failed()
        with self._arrivals:
            self._early[number] = transition
            while self._next in self._early:
                self._inbox.put(self._early.pop(self._next))
                self._next += 1
            self._arrivals.notify_all()
        if self._inbox.qsize() == _BACKLOG_WARNING:
            log.warning("the agent learner is %d transitions behind the LM", _BACKLOG_WARNING)

    def next_policy(self, known: int, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The newest publication after number ``known``: ``{"version", "policy", "metrics", "learned"}``
        (``learned``: transitions the policy has learned from); waits for one, None after ``timeout_s``."""
        with self._published:
            self._published.wait_for(lambda: self._version > known or self._error is not None, timeout_s)
            self._raise_if_failed()
            if self._version <= known:
                return None
            return {"version": self._version, "policy": self._policy, "metrics": self._metrics,
                    "learned": self._learned}

    def state_dict(self, after: int) -> dict[str, Any]:
        """The mixer's state once transitions ``0 .. after - 1`` have been learned from."""
        return self._on_worker(lambda mixer: mixer.state_dict(), after)

    def load_state_dict(self, state: Mapping[str, Any], after: int) -> None:
        """Restore the mixer once transitions ``0 .. after - 1`` have been learned from."""
        self._on_worker(lambda mixer: mixer.load_state_dict(state), after)

    def _on_worker(self, call: Callable[[Any], Any], after: int) -> Any:
        """Run ``call(mixer)`` on the learning thread, queued behind transition ``after - 1``."""
        self._raise_if_failed()
        with self._arrivals:
            self._arrivals.wait_for(lambda: self._next >= after)
        done: Future[Any] = Future()
        self._inbox.put((call, done))
        return done.result()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the agent learner failed: {self._error!r}") from self._error

    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if isinstance(item, tuple):  # a call queued behind the transitions before it
                call, done = item
                try:
                    done.set_result(call(self._mixer))
                except BaseException as exc:  # handed to the caller
                    done.set_exception(exc)
                continue
            try:
                self._mixer.observe(item)
                metrics = self._mixer.update()
                self._learned += 1
                if metrics:
                    self._publish(metrics)
            except BaseException as exc:  # raised to the caller's next call; the thread stops learning
                log.exception("agent update failed")
                with self._published:
                    self._error = exc
                    self._published.notify_all()
                return

    def _publish(self, metrics: dict[str, float]) -> None:
        # numpy arrays: Ray hands them back without unpickling a tensor per entry
        policy = {name: t.detach().to("cpu").numpy().copy() for name, t in self._mixer.policy.state_dict().items()}
        with self._published:
            self._version += 1
            self._policy, self._metrics = policy, metrics
            self._published.notify_all()


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """Everything needed to (re)create the learner; picklable.

    Attributes:
        agent_cfg, observation_space, action_space, mixer_kwargs: the mixer's constructor arguments.
        resources: ``ray.agent_resources`` (``CPU``, ``GPU``, ``memory``, custom resources).
        num_threads: torch threads in the actor; None = max(1, the actor's CPUs rounded down).
        mixer_factory: the learner's mixer builder (tests slow it down); None = ``agents.build_mixer``.
            The acting copy is always ``agents.build_mixer``'s.
    """

    agent_cfg: Any
    observation_space: Any
    action_space: Any
    mixer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 0.0})
    num_threads: int | None = None
    mixer_factory: MixerFactory | None = None

    def actor_options(self) -> dict[str, Any]:
        """``ray.remote(...).options``: the resources; no Ray restarts (recovery restores the last
        checkpoint's state, which Ray cannot); enough concurrency for a waiting ``next_policy``."""
        return {**ray_options(self.resources), "max_restarts": 0, "max_concurrency": 4}

    def build_mixer(self, **overrides: Any) -> Any:
        """A local mixer from this spec (the acting copy), with ``agent_cfg`` fields overridden."""
        cfg = self.agent_cfg.model_copy(update=overrides) if overrides else self.agent_cfg
        return build_mixer(cfg, self.observation_space, self.action_space, **dict(self.mixer_kwargs))

    def start(self, state: Mapping[str, Any] | None = None) -> Any:
        """Start a learner actor, loaded with ``state`` when given; returns its handle."""
        opts = self.actor_options()
        threads = self.num_threads if self.num_threads is not None else max(1, int(opts["num_cpus"]))
        handle = ray.remote(Learner).options(**opts).remote(
            self.agent_cfg, self.observation_space, self.action_space, dict(self.mixer_kwargs), threads,
            self.mixer_factory,
        )
        if state is not None:
            ray.get(handle.load_state_dict.remote(state, 0))
        return handle


class ActingMixer:
    """Rank 0's side of the pair: the ``Mixer`` methods the run loop calls (module docstring).

    Args:
        spec: how to build the mixer and start the learner.
    """

    def __init__(self, spec: LearnerSpec) -> None:
        self.spec = spec
        # The copy only acts (a forward pass of the actor): CPU whatever agent.device says.
        self.copy = spec.build_mixer(device="cpu")
        self.kind, self.domain_names = self.copy.kind, self.copy.domain_names
        self.restarts = 0
        self._checkpoint_state: Mapping[str, Any] | None = None  # the agent at the last state_dict
        self._since_checkpoint: list[Transition] = []  # transitions after it, resubmitted on recovery
        self._connect(spec.start())

    def _connect(self, learner: Any) -> None:
        """Act from ``learner``'s publications from now on (a new learner, or one just restored)."""
        self.learner = learner
        self._submitted = 0  # transitions submitted to this learner
        self._learned = 0  # of those, the ones the acting policy has learned from
        self._metrics: dict[str, float] = {}
        self._reply = learner.next_policy.remote(0)

    # -- the Mixer methods -----------------------------------------------------------------------------
    def act(self, obs: Any, *, explore: bool = True) -> Any:
        """The copy's action, from the newest policy already back from the learner (never waits)."""
        if ray.wait([self._reply], timeout=0)[0]:
            self._take_reply()
        return self.copy.act(obs, explore=explore)

    def observe(self, transition: Transition) -> None:
        """Record on the copy, submit to the learner (no waiting)."""
        self.copy.observe(transition)
        self._since_checkpoint.append(transition)
        self._submit(transition)

    def update(self) -> dict[str, float]:
        """The metrics of the newest learner update taken in since the last call ({} if none), with the
        policy lag (transitions submitted that the acting policy has not learned from) and the learner
        restarts."""
        metrics, self._metrics = self._metrics, {}
        if metrics:
            metrics["agent/policy_lag"] = float(self._submitted - self._learned)
        if self.restarts:
            metrics["agent/restarts"] = float(self.restarts)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The whole agent, once the learner has taken every transition submitted (for checkpoints)."""
        state = self._call(lambda: ray.get(self.learner.state_dict.remote(self._submitted)))
        self._checkpoint_state, self._since_checkpoint = state, []
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the learner and the copy (resume from a checkpoint)."""
        self._call(lambda: ray.get(self.learner.load_state_dict.remote(state, self._submitted)))
        self.copy.load_state_dict(state)
        self._checkpoint_state, self._since_checkpoint = state, []
        self._connect(self.learner)  # publications from before the restore are stale

    def save_policy(self, path: Any) -> None:
        """Write the policy file from the learner's current state (through a local mixer, so the file
        lands on this node)."""
        mixer = self.spec.build_mixer()
        mixer.load_state_dict(self.state_dict())
        mixer.save_policy(path)

    def close(self) -> None:
        """Stop the learner (transitions still queued are dropped)."""
        with contextlib.suppress(Exception):
            ray.kill(self.learner, no_restart=True)

    # -- replies and recovery --------------------------------------------------------------------------
    def _submit(self, transition: Transition) -> None:
        self.learner.submit.remote(transition, self._submitted)  # no waiting: a dead learner shows later
        self._submitted += 1

    def _take_reply(self) -> None:
        try:
            reply = ray.get(self._reply)
        except ray.exceptions.RayActorError as exc:
            self._recover(exc)  # the copy keeps acting from the policy it has
            return
        self.copy.policy.load_state_dict({name: torch.tensor(array) for name, array in reply["policy"].items()})
        self._learned, self._metrics = reply["learned"], dict(reply["metrics"])
        self._reply = self.learner.next_policy.remote(reply["version"])

    def _call(self, call: Callable[[], Any]) -> Any:
        """Run ``call``; if it meets a dead learner, recover and run it once more."""
        try:
            return call()
        except ray.exceptions.RayActorError as exc:
            self._recover(exc)
            return call()

    def _recover(self, exc: BaseException) -> None:
        """Replace a dead learner: the last checkpoint's agent state, then every transition since."""
        self.restarts += 1
        log.warning(
            "agent learner died (%s); starting a new one from the last checkpoint's agent state and "
            "resubmitting the %d transitions since", exc, len(self._since_checkpoint),
        )
        with contextlib.suppress(Exception):
            ray.kill(self.learner, no_restart=True)
        self._connect(self.spec.start(self._checkpoint_state))
        for transition in self._since_checkpoint:
            self._submit(transition)
