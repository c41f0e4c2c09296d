"""The data-mixing agent as a Ray actor, so the LM never waits for an agent update.

``AgentActor`` is a thin wrapper that builds any ``Mixer`` (``agents.build_mixer`` by default) and
delegates ``act``, ``observe``, ``update``, ``state_dict`` and ``load_state_dict`` to it. What it adds is
scheduling:

* ``observe`` records the transition at once (so the next ``act`` sees it, which the ODM bandits and
  the AC-ODM warmup need) and queues one ``update()``. The update is released to a background thread
  when the next ``act`` has been answered (or at the next ``observe``/``drain``): the train loop sends
  ``observe(t)`` then ``act(t+1)`` back to back, so starting the update earlier would only compete with
  that ``act`` for the CPU. Released this way, update ``t`` runs while the LM trains step ``t+1``.
* Overlapped mode (``overlap_act=True``, the default, for a mixer whose ``concurrent_update`` is true,
  such as AC-ODM): ``act`` and ``observe`` run while an update is in flight. ``act`` answers from the
  latest *published* policy (AC-ODM double-buffers its actor; see ``agents.ac_odm``), so it never waits
  for an update however slow the agent is; the price is that which policy answers depends on timing,
  so an online agent under Ray does not repeat bit for bit (``stats()["policy_lag"]`` says how far
  behind the acting policy was).
* Ordered mode (``overlap_act=False``, or a mixer without ``concurrent_update``): every mixer call holds
  one lock, so ``act`` waits for the update in flight (at most that one: the update thread yields to a
  waiting caller before starting the next queued update). The policy then lags the local loop by
  exactly one update and a run repeats exactly.
* ``drain()`` releases and runs every queued update; ``state_dict()`` drains first, so a checkpoint
  holds the agent after every transition the run has sent it, and ``act`` after ``drain`` equals the
  local mixer's ``act`` exactly (both modes).

Ray runs the calls of one caller in submission order on this synchronous actor (``max_concurrency=1``),
so ``observe`` then ``act`` from the train loop always happen in that order. The class is plain Python
(not decorated) so it also runs in-process; ``create_agent_actor`` turns it into a Ray actor with
``ray.agent_resources``. ``RemoteMixer`` is the client side: it exposes the ``Mixer`` methods over an
actor handle (blocking ``act``/``state_dict``, fire-and-forget ``observe``) and can ``restart`` a dead
actor from a checkpointed state, so the run loop treats a local and a remote mixer alike.

``LocalActingMixer`` (the default client for AC-ODM, ``ray.agent_acting: local``) removes the round
trip from the step as well: the caller keeps a copy of the mixer and acts from the policy snapshots the
actor publishes; each transition goes to ``AgentActor.learn``, which observes, runs the update in the
call (no update thread in the actor: Ray's per-caller order serialises the transitions) and replies with
the new snapshot, which a thread on the caller's side takes in. See its docstring for the two schedules
(``ray.agent_async``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import ray

from ray_jobs.cluster import ray_options

log = logging.getLogger(__name__)

MixerFactory = Callable[..., Any]
# Fire-and-forget observe results kept before the oldest finished ones are checked for errors.
_MAX_INFLIGHT_OBSERVES = 64
_BACKLOG_WARNING = 16


class AgentActorDiedError(RuntimeError):
    """The agent actor is gone (killed, crashed, node lost); ``RemoteMixer.restart`` brings it back."""


class AgentUpdateError(RuntimeError):
    """A background ``update()`` raised; the original exception is the ``__cause__``."""


class AgentActor:
    """Delegates to one ``Mixer`` and runs its updates on a background thread.

    Args:
        agent_cfg: the ``AgentConfig`` (first argument of the factory).
        observation_space: the env's observation space.
        action_space: the env's action space.
        mixer_factory: builds the mixer from ``(agent_cfg, observation_space, action_space, **mixer_kwargs)``;
            default ``agents.build_mixer``. Must be picklable when the actor is remote.
        auto_update: True: every ``observe`` queues one background ``update()`` (the Ray mode).
            False: nothing runs by itself and the caller calls ``update()`` (the exact, in-order mode).
        overlap_act: with ``auto_update``, let ``act``/``observe`` run during an update when the mixer's
            ``concurrent_update`` allows it (never waits; not bit-reproducible). False: ordered mode.
        num_threads: ``torch.set_num_threads`` in this process (None leaves torch's default).
        **mixer_kwargs: passed through to the factory (``seed``, ``domain_names``, ``total_steps``, ...).
    """

    def __init__(
        self,
        agent_cfg: Any,
        observation_space: Any,
        action_space: Any,
        *,
        mixer_factory: MixerFactory | None = None,
        auto_update: bool = True,
        overlap_act: bool = True,
        num_threads: int | None = None,
        **mixer_kwargs: Any,
    ) -> None:
        if num_threads is not None:
            import torch

            torch.set_num_threads(int(num_threads))
        if mixer_factory is None:
            from agents.base import build_mixer

            mixer_factory = build_mixer
        self._mixer = mixer_factory(agent_cfg, observation_space, action_space, **mixer_kwargs)
        self._auto_update = bool(auto_update)
        # Overlapped: act/observe skip the mixer lock, which then serialises only update/state calls.
        self._overlap = self._auto_update and overlap_act and bool(getattr(self._mixer, "concurrent_update", False))
        self._mixer_lock = threading.Lock()  # held while the mixer runs any method
        self._state = threading.Condition()  # guards the counters below
        self._queued = 0  # updates observed but not yet released to the update thread
        self._pending = 0  # updates released and not finished
        self._foreground_waiting = 0  # act/observe/... calls waiting for the mixer lock
        self._observed = 0
        self._updates_done = 0
        self._update_s = 0.0
        self._policy_lag = 0  # transitions observed but not yet learned from, when the last act answered
        self._max_policy_lag = 0
        self._latest: dict[str, float] = {}
        self._fresh = False  # an update finished since the last poll_metrics()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._update_loop, name="agent-update", daemon=True)
        self._thread.start()

    # -- the Mixer methods -----------------------------------------------------------------------------
    def act(self, obs: np.ndarray, explore: bool = True) -> np.ndarray:
        """The next mixture from the latest published policy (ordered mode: waits for at most the update
        in flight; overlapped mode: never waits for an update)."""
        with self._caller():
            weights = self._mixer.act(obs, explore=explore)
        with self._state:
            self._policy_lag = self._observed - self._updates_done
            self._max_policy_lag = max(self._max_policy_lag, self._policy_lag)
        self._release()
        return weights

    def act_and_poll(self, obs: np.ndarray, explore: bool = True) -> tuple[np.ndarray, dict[str, float]]:
        """``act`` and ``poll_metrics`` in one call: the remote loop's one round trip per step."""
        weights = self.act(obs, explore)
        return weights, self.poll_metrics()

    def observe(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: Any,
        next_obs: np.ndarray,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the transition now; queue one background ``update()`` when ``auto_update``."""
        with self._caller():
            self._mixer.observe(obs, weights, reward, next_obs, {} if info is None else info)
        with self._state:
            self._observed += 1
            if self._auto_update:
                self._pending += self._queued  # an earlier transition no act has released yet
                self._queued = 1
                if self._pending + self._queued == _BACKLOG_WARNING:
                    log.warning("agent updates are %d transitions behind the LM", _BACKLOG_WARNING)
                self._state.notify_all()

    def learn(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: Any,
        next_obs: np.ndarray,
        info: Mapping[str, Any] | None = None,
        acting_state: Mapping[str, Any] | None = None,
        since_version: int = -1,
        sequence: int | None = None,
    ) -> dict[str, Any]:
        """The learner's side of split acting (``LocalActingMixer``; the caller acts from its own copy
        of the policy): take over the caller's ``acting_state``, record the transition, run the update
        it is owed now, and return the newly published policy.

        Returns:
            ``{"snapshot": policy_snapshot() or None if its version is not above since_version,
            "metrics": the update's metrics, "learned": ``sequence`` (the caller's number for this
            transition: every one up to it that reached this actor is learned from), or the transitions
            this actor has learned from when it is None}``.
        """
        start = time.perf_counter()
        with self._foreground():
            if acting_state is not None:
                self._mixer.load_acting_state(acting_state)
            self._mixer.observe(obs, weights, reward, next_obs, {} if info is None else info)
            metrics = dict(self._mixer.update())
            snapshot = self._mixer.policy_snapshot(since_version)
        with self._state:
            self._observed += 1
            learned = self._observed if sequence is None else int(sequence)
        self._record_update(metrics, time.perf_counter() - start)
        return {"snapshot": snapshot, "metrics": metrics, "learned": learned}

    def learn_packed(self, payload: bytes) -> dict[str, Any]:
        """``learn(*pickle.loads(payload))``: ``LocalActingMixer`` pickles the transition into one bytes
        argument, which halves the caller's submission cost against separately serialised arguments
        (0.31 vs 0.65 ms for seven of them, measured on the development VM)."""
        return self.learn(*pickle.loads(payload))

    def update(self) -> dict[str, float]:
        """Run one ``update()`` now, in the caller's order (the ``auto_update=False`` mode)."""
        start = time.perf_counter()
        with self._foreground():
            metrics = dict(self._mixer.update())
        self._record_update(metrics, time.perf_counter() - start)
        return metrics

    def state_dict(self, drain: bool = True) -> dict[str, Any]:
        """The mixer's full state; by default after every queued update has run."""
        if drain:
            self.drain()
        with self._foreground():
            return self._mixer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Drain the queue, then restore the mixer from ``state``."""
        self.drain()
        with self._foreground():
            self._mixer.load_state_dict(state)
        with self._state:
            self._latest, self._fresh = {}, False

    # -- scheduling ------------------------------------------------------------------------------------
    def drain(self, timeout_s: float | None = None) -> int:
        """Release every queued update and block until none is left; returns the updates done so far.

        Raises:
            TimeoutError: updates still pending after ``timeout_s``.
            AgentUpdateError: a background update failed.
        """
        with self._state:
            self._pending, self._queued = self._pending + self._queued, 0
            self._state.notify_all()
            done = self._state.wait_for(
                lambda: self._pending == 0 or self._error is not None or self._closed, timeout_s
            )
            self._raise_if_failed()
            if self._pending and self._closed:
                raise RuntimeError(f"agent actor closed with {self._pending} updates not run")
            if not done:
                raise TimeoutError(f"agent updates still pending after {timeout_s} s: {self._pending} queued")
            return self._updates_done

    def latest_metrics(self) -> dict[str, float]:
        """The metrics of the last finished update ({} before the first)."""
        with self._state:
            return dict(self._latest)

    def poll_metrics(self) -> dict[str, float]:
        """The last update's metrics if an update finished since the previous poll, else {}."""
        with self._state:
            self._raise_if_failed()
            fresh, self._fresh = self._fresh, False
            return dict(self._latest) if fresh else {}

    def stats(self) -> dict[str, float]:
        """Counters: transitions observed, updates done and pending, seconds spent updating, and the
        policy lag (transitions the answering policy had not learned from) at the last ``act`` and its
        maximum; ``overlapped`` is 1.0 when ``act`` may run during an update."""
        with self._state:
            return {
                "observed": float(self._observed),
                "updates_done": float(self._updates_done),
                "pending": float(self._pending + self._queued),
                "update_s": self._update_s,
                "policy_lag": float(self._policy_lag),
                "max_policy_lag": float(self._max_policy_lag),
                "overlapped": float(self._overlap),
            }

    def close(self) -> None:
        """Stop the update thread after the update in flight (queued ones are dropped)."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._thread.join()

    def _caller(self) -> contextlib.AbstractContextManager[None]:
        """How ``act``/``observe`` reach the mixer: without the mixer lock when overlapped."""
        return self._checked() if self._overlap else self._foreground()

    @contextlib.contextmanager
    def _checked(self) -> Iterator[None]:
        with self._state:
            self._raise_if_failed()
        yield

    @contextlib.contextmanager
    def _foreground(self) -> Iterator[None]:
        """Hold the mixer lock for a caller, asking the update thread to yield before its next update."""
        with self._state:
            self._raise_if_failed()
            self._foreground_waiting += 1
        try:
            with self._mixer_lock:
                yield
        finally:
            with self._state:
                self._foreground_waiting -= 1
                self._state.notify_all()

    def _release(self) -> None:
        """Hand the queued update(s) to the update thread (after an ``act`` was answered)."""
        with self._state:
            if self._queued:
                self._pending, self._queued = self._pending + self._queued, 0
                self._state.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AgentUpdateError(f"a background agent update failed: {self._error!r}") from self._error

    def _record_update(self, metrics: dict[str, float], seconds: float) -> None:
        with self._state:
            self._updates_done += 1
            self._update_s += seconds
            self._latest, self._fresh = metrics, True

    def _update_loop(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(
                    lambda: self._closed or (self._pending > 0 and self._foreground_waiting == 0)
                )
                if self._closed:
                    return
            start = time.perf_counter()
            try:
                with self._mixer_lock:
                    metrics = dict(self._mixer.update())
            except BaseException as exc:  # surfaced to the next caller; the thread stops
                log.exception("agent update failed")
                with self._state:
                    self._error, self._pending, self._queued = exc, 0, 0
                    self._state.notify_all()
                return
            self._record_update(metrics, time.perf_counter() - start)
            with self._state:
                self._pending -= 1
                self._state.notify_all()


@dataclasses.dataclass(frozen=True)
class AgentActorSpec:
    """Everything needed to (re)create the agent actor; picklable, so it can travel to Ray workers.

    Attributes:
        agent_cfg, observation_space, action_space, mixer_kwargs: the mixer's constructor arguments.
        resources: ``ray.agent_resources`` (``CPU``, ``GPU``, ``memory``, custom resources).
        mixer_factory: None = ``agents.build_mixer``.
        auto_update: background updates after each ``observe`` (see ``AgentActor``).
        overlap_act: ``act`` never waits for an update (``ray.agent_async``; see ``AgentActor``).
        num_threads: torch threads in the actor; None = max(1, the actor's CPUs rounded down).
        name, namespace, detached: a named actor can be found with ``ray.get_actor``; a detached one
            outlives the process that created it (its creator must ``close`` it).
    """

    agent_cfg: Any
    observation_space: Any
    action_space: Any
    mixer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 0.0})
    mixer_factory: MixerFactory | None = None
    auto_update: bool = True
    overlap_act: bool = True
    num_threads: int | None = None
    name: str | None = None
    namespace: str | None = None
    detached: bool = False

    def actor_options(self) -> dict[str, Any]:
        """``ray.remote(...).options`` keywords: resources, no Ray restarts (we restore from checkpoints)."""
        opts = ray_options(self.resources)
        opts.update(max_restarts=0, max_concurrency=1)
        if self.name is not None:
            opts["name"] = self.name
        if self.namespace is not None:
            opts["namespace"] = self.namespace
        if self.detached:
            opts["lifetime"] = "detached"
        return opts


def create_agent_actor(spec: AgentActorSpec, state: Mapping[str, Any] | None = None) -> Any:
    """Start an agent actor from ``spec``; with ``state``, load it before returning (recovery path).

    Returns:
        The actor handle (picklable: pass it to Ray Train workers in ``train_loop_config``).
    """
    opts = spec.actor_options()
    threads = spec.num_threads
    if threads is None:
        threads = max(1, int(opts["num_cpus"]))
    handle = (
        ray.remote(AgentActor)
        .options(**opts)
        .remote(
            spec.agent_cfg,
            spec.observation_space,
            spec.action_space,
            mixer_factory=spec.mixer_factory,
            auto_update=spec.auto_update,
            overlap_act=spec.overlap_act,
            num_threads=threads,
            **dict(spec.mixer_kwargs),
        )
    )
    if state is not None:
        _get(handle.load_state_dict.remote(state))
    return handle


def _get(refs: Any, timeout_s: float | None = None) -> Any:
    """``ray.get`` that turns a dead actor into ``AgentActorDiedError``."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayActorError as exc:
        raise AgentActorDiedError(f"the agent actor died: {exc}") from exc
    except ray.exceptions.GetTimeoutError as exc:
        raise TimeoutError(f"the agent actor did not answer within {timeout_s} s") from exc


class RemoteMixer:
    """The ``Mixer`` methods over an agent actor handle, for the run loop.

    ``act``, ``state_dict``, ``load_state_dict`` block; ``observe`` does not (its result is checked at
    the next ``act``, so an error in it still surfaces). ``update`` does not train and does not call
    the actor: the actor updates by itself after each ``observe`` (``auto_update``), and each ``act``
    brings back the metrics of the updates finished since the previous one (``act_and_poll``: one
    round trip per step, not two); ``update`` returns those ({} if none), which is what the ledger's
    ``agent/*`` columns want, as of the last ``act`` or ``drain``. With ``auto_update=False`` it runs
    one update remotely and waits for it.

    Picklable (the spec and the handle travel; in-flight results do not), so the same object can go
    into ``train_loop_config``.
    """

    def __init__(self, spec: AgentActorSpec, handle: Any | None = None, *, timeout_s: float | None = None):
        self.spec = spec
        self.timeout_s = timeout_s
        self.handle = create_agent_actor(spec) if handle is None else handle
        self._inflight: list[Any] = []
        self._polled: dict[str, float] = {}  # metrics brought back by act/drain, not yet returned by update

    @property
    def kind(self) -> str:
        """The mixer kind (``agent.kind``), as on a local mixer."""
        return str(getattr(self.spec.agent_cfg, "kind", "unknown"))

    @property
    def domain_names(self) -> list[str]:
        """The K domain names the mixer was built with."""
        return list(self.spec.mixer_kwargs.get("domain_names", []))

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "timeout_s": self.timeout_s, "handle": self.handle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._inflight, self._polled = [], {}

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The next mixture; also surfaces an error from an earlier ``observe`` and (auto mode) collects
        the metrics of updates finished since the previous ``act``."""
        if not self.spec.auto_update:
            refs = [*self._inflight, self.handle.act.remote(obs, explore)]
            self._inflight = []
            return _get(refs, self.timeout_s)[-1]
        refs = [*self._inflight, self.handle.act_and_poll.remote(obs, explore)]
        self._inflight = []
        weights, metrics = _get(refs, self.timeout_s)[-1]
        self._keep(metrics)
        return weights

    def observe(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: Any,
        next_obs: np.ndarray,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Send the transition without waiting."""
        self._inflight.append(self.handle.observe.remote(obs, weights, reward, next_obs, info))
        if len(self._inflight) > _MAX_INFLIGHT_OBSERVES:
            done, self._inflight = ray.wait(self._inflight, num_returns=len(self._inflight), timeout=0)
            _get(done)

    def update(self) -> dict[str, float]:
        """Auto mode: the metrics of the newest update finished by the last ``act``/``drain`` and not
        returned yet ({} if none; no actor call). Otherwise: one remote update, waited for."""
        if self.spec.auto_update:
            metrics, self._polled = self._polled, {}
            return metrics
        refs = [*self._inflight, self.handle.update.remote()]
        self._inflight = []
        return _get(refs, self.timeout_s)[-1]

    def _keep(self, metrics: Mapping[str, float]) -> None:
        if metrics:  # poll_metrics returns the newest finished update's metrics, {} when none is new
            self._polled = dict(metrics)

    def state_dict(self) -> dict[str, Any]:
        """The agent's full state after every queued update (for checkpoints)."""
        return _get(self.handle.state_dict.remote(True), self.timeout_s)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the actor's mixer from ``state``."""
        _get(self.handle.load_state_dict.remote(state), self.timeout_s)

    def drain(self) -> int:
        """Wait for the actor's queued updates (and collect their metrics); returns the updates done."""
        refs = [*self._inflight, self.handle.drain.remote(), self.handle.poll_metrics.remote()]
        self._inflight = []
        *_, done, metrics = _get(refs, self.timeout_s)
        self._keep(metrics)
        return done

    def latest_metrics(self) -> dict[str, float]:
        """The last finished update's metrics."""
        return _get(self.handle.latest_metrics.remote(), self.timeout_s)

    def stats(self) -> dict[str, float]:
        """The actor's counters (``AgentActor.stats``)."""
        return _get(self.handle.stats.remote(), self.timeout_s)

    def restart(self, state: Mapping[str, Any] | None) -> None:
        """Replace the actor (dead or alive) with a new one loaded from ``state`` (e.g. the last checkpoint)."""
        with contextlib.suppress(Exception):
            ray.kill(self.handle, no_restart=True)
        self._inflight, self._polled = [], {}
        if self.spec.name is not None:
            _wait_name_free(self.spec.name, self.spec.namespace)
        self.handle = create_agent_actor(self.spec, state)
        log.warning("agent actor recreated%s", "" if state is None else " from the checkpointed state")

    def close(self) -> None:
        """Kill the actor (its queued updates are dropped)."""
        with contextlib.suppress(Exception):
            ray.kill(self.handle, no_restart=True)
        self._inflight = []


class LocalActingMixer:
    """Split acting: the caller (rank 0) acts from its own copy of the agent's published policy; the
    agent actor learns. For mixers with ``acts_from_snapshot`` (AC-ODM), the default of ``acodm train``.

    Why: with ``RemoteMixer`` every LM step waits for one actor round trip (about 1-7 ms on a busy
    CPU node: scheduling, pickling, the actor's thread). Here a step costs the acting copy's forward
    pass and one fire-and-forget submission, and the actor never waits for the caller either.

    Per step: ``act`` acts locally from the newest policy the actor has sent back (warmup teacher or
    actor network, exploration from the copy's own seeded generator: the same stream the actor would
    have drawn). ``observe`` records the decision on the copy (``observe_acting``) and submits
    ``AgentActor.learn`` with the transition and the copy's ``acting_state``; the actor runs the update
    and replies with the newly published snapshot, the update's metrics and how many transitions it has
    learned from.

    * ``asynchronous=True`` (``ray.agent_async``): a background thread here waits for the replies and
      loads each new snapshot into the copy's back buffer, then swaps it in (the copy double-buffers its
      policy like the learner), so neither the wait, the deserialisation nor the weight copy is on the
      step's path (a 16 MiB snapshot at the reference's 1024x5 networks takes ~4 ms to copy on a CPU
      node). When several replies are back at once only the newest snapshot is loaded. ``act`` never
      waits; the policy lags by the transitions still in flight (``stats()["policy_lag"]``).
    * ``asynchronous=False``: no thread; before acting at step t+1, ``act`` waits for the reply to step
      t-1's transition and never uses step t's even if it is already back: the policy lags by exactly
      one update, as in the ordered ``RemoteMixer``, and the run repeats exactly (the two schedules act
      identically).

    The actor holds the whole agent (its ``state_dict`` includes the copy's exploration state, handed
    over with every transition), so checkpoints, ``restart`` and ``load_state_dict`` work as with
    ``RemoteMixer``; after a restore the copy reloads the same state and replies sent before it are
    dropped. An error in a reply (the actor died) is raised by the next ``act`` or ``drain``. The copy
    runs on CPU whatever ``agent.device`` says (the actor network's forward pass; no optimiser, no
    replay buffer use).
    """

    def __init__(
        self,
        spec: AgentActorSpec,
        handle: Any | None = None,
        *,
        asynchronous: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        # The actor must not queue background updates: learn() runs each update in the call itself.
        spec = dataclasses.replace(spec, auto_update=False)
        self.asynchronous = bool(asynchronous)
        self.replica = self._build_replica(spec)
        if not getattr(self.replica, "acts_from_snapshot", False):
            raise ValueError(
                f"agent.kind = {getattr(spec.agent_cfg, 'kind', '?')!r} cannot act from a policy "
                "snapshot; use RemoteMixer (ray.agent_acting: actor)"
            )
        self.remote = RemoteMixer(spec, handle, timeout_s=timeout_s)
        self._observed = 0  # transitions sent to the actor
        self._max_lag = 0
        self._init_sync()
        # Both start from the same initial policy (same seed, or the same policy file): version 0.
        self._reset_replies(version=0)

    @staticmethod
    def _build_replica(spec: AgentActorSpec) -> Any:
        factory = spec.mixer_factory
        if factory is None:
            from agents.base import build_mixer

            factory = build_mixer
        cfg = spec.agent_cfg
        if getattr(cfg, "device", "cpu") != "cpu":
            cfg = cfg.model_copy(update={"device": "cpu"})
        return factory(cfg, spec.observation_space, spec.action_space, **dict(spec.mixer_kwargs))

    def _init_sync(self) -> None:
        self._cond = threading.Condition()  # guards the reply bookkeeping, shared with the applier thread
        self._apply_lock = threading.Lock()  # held while the copy's policy or state is replaced
        self._generation = 0  # bumped by every reset: replies sent before it are dropped
        self._closed = False
        self._applier: threading.Thread | None = None

    def _reset_replies(self, version: int) -> None:
        """Forget replies in flight; ``version`` = the actor's policy version the copy now acts from
        (-1 after a restore: the next reply then carries the actor's policy, whatever its version)."""
        with self._cond:
            self._generation += 1
            self._inflight: collections.deque[tuple[int, Any]] = collections.deque()  # oldest first
            self._polled: dict[str, float] = {}
            self._version = version
            self._learned = self._observed  # transitions in the policy the copy acts from
            self._error: BaseException | None = None
            self._cond.notify_all()

    # -- what RecoveringMixer and the run loop use ----------------------------------------------------
    @property
    def spec(self) -> AgentActorSpec:
        """The actor's spec (``auto_update`` off)."""
        return self.remote.spec

    @property
    def handle(self) -> Any:
        """The agent actor's handle."""
        return self.remote.handle

    @property
    def kind(self) -> str:
        """The mixer kind (``agent.kind``)."""
        return self.remote.kind

    @property
    def domain_names(self) -> list[str]:
        """The K domain names."""
        return self.remote.domain_names

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """Act locally from the newest policy back from the actor (ordered: after waiting for the reply
        to step t-1's transition)."""
        if self.asynchronous:
            self._raise_if_failed()
        else:
            self._collect(keep_newest=True)
        with self._cond:
            lag = self._observed - self._learned
        self._max_lag = max(self._max_lag, lag)
        return self.replica.act(obs, explore=explore)

    def observe(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: Any,
        next_obs: np.ndarray,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the decision on the copy, send the transition to the actor without waiting."""
        info = {} if info is None else info
        self.replica.observe_acting(obs, weights, reward, next_obs, info)
        with self._cond:
            self._observed += 1
            sequence, since = self._observed, self._version
        acting = self.replica.acting_state()
        transition = (obs, weights, reward, next_obs, info, acting, since, sequence)
        ref = self.remote.handle.learn_packed.remote(pickle.dumps(transition, protocol=5))
        with self._cond:
            self._inflight.append((self._generation, ref))
            backlog = len(self._inflight)
            self._cond.notify_all()
        if self.asynchronous and (self._applier is None or not self._applier.is_alive()):
            self._applier = threading.Thread(target=self._apply_loop, name="agent-policy-applier", daemon=True)
            self._applier.start()
        if backlog == _BACKLOG_WARNING:
            log.warning("agent updates are %d transitions behind the LM", _BACKLOG_WARNING)

    def update(self) -> dict[str, float]:
        """The metrics of the newest update whose reply has been taken in and that were not returned
        yet ({} if none; no actor call)."""
        with self._cond:
            metrics, self._polled = self._polled, {}
        return metrics

    def drain(self) -> int:
        """Wait for every reply and act from the newest policy; returns the transitions learned from."""
        if self.asynchronous:
            with self._cond:
                self._cond.wait_for(lambda: not self._inflight or self._error is not None or self._closed)
            self._raise_if_failed()
        else:
            self._collect(keep_newest=False)
        with self._cond:
            return self._learned

    def _raise_if_failed(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _collect(self, *, keep_newest: bool) -> None:
        """Ordered mode: take in every reply but the newest (``keep_newest``), waiting for them."""
        with self._cond:
            count = len(self._inflight) - (1 if keep_newest else 0)
            due = [self._inflight.popleft() for _ in range(max(count, 0))]
        if not due:
            return
        replies = _get([ref for _, ref in due], self.remote.timeout_s)
        snapshots = [r["snapshot"] for r in replies if r["snapshot"] is not None]
        metrics = next((r["metrics"] for r in reversed(replies) if r["metrics"]), {})
        self._take(due[-1][0], snapshots[-1] if snapshots else None, metrics, replies[-1]["learned"])

    def _take(self, generation: int, snapshot: Mapping[str, Any] | None, metrics: Mapping[str, float],
              learned: int | None) -> None:
        """Take in a reply of ``generation``: act from ``snapshot`` if it is newer, note the metrics and
        (unless None: a reply whose policy was skipped) the transitions the policy has learned from."""
        with self._apply_lock:
            with self._cond:
                if generation != self._generation:
                    return  # sent before a restore
                version = self._version
            if learned is not None and snapshot is not None and snapshot["version"] > version:
                self.replica.load_policy_snapshot(snapshot)  # back buffer, then swap: act never waits
                version = int(snapshot["version"])
            with self._cond:
                self._version = version
                if learned is not None:
                    self._learned = max(self._learned, learned)
                if metrics:
                    self._polled = dict(metrics)

    def _apply_loop(self) -> None:
        """Asynchronous mode's thread: take in each reply as it arrives, loading only the newest policy
        when several are back."""
        carried = None  # a snapshot not loaded because a newer reply was already back
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._inflight) or self._closed)
                if self._closed:
                    return
                item = self._inflight[0]
                following = self._inflight[1][1] if len(self._inflight) > 1 else None
            generation, ref = item
            try:
                reply = _get(ref, self.remote.timeout_s)
            except BaseException as exc:  # raised to the caller by its next act/drain
                with self._cond:
                    if generation == self._generation and self._error is None:
                        self._error = exc
                    if self._inflight and self._inflight[0] is item:
                        self._inflight.popleft()
                    self._cond.notify_all()
                continue
            snapshot = reply["snapshot"] if reply["snapshot"] is not None else carried
            newer_back = following is not None and bool(ray.wait([following], timeout=0)[0])
            carried = snapshot if newer_back else None
            self._take(generation, snapshot, reply["metrics"], None if newer_back else reply["learned"])
            with self._cond:
                if self._inflight and self._inflight[0] is item:
                    self._inflight.popleft()
                self._cond.notify_all()

    def state_dict(self) -> dict[str, Any]:
        """The whole agent from the actor (after every transition sent; it holds the copy's exploration
        state as of the last one)."""
        return self.remote.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the actor and the copy from ``state``."""
        self.drain()
        self.remote.load_state_dict(state)
        with self._apply_lock:
            self.replica.load_state_dict(state)
            self._reset_replies(version=-1)

    def latest_metrics(self) -> dict[str, float]:
        """The last finished update's metrics (from the actor)."""
        return self.remote.latest_metrics()

    def stats(self) -> dict[str, float]:
        """The actor's counters, with the policy lag measured here (transitions sent but not yet in the
        policy the copy acted from) and ``pending`` = replies not taken in yet; ``local_acting`` is 1.0."""
        out = dict(self.remote.stats())
        with self._cond:
            out.update(
                pending=float(len(self._inflight)),
                policy_lag=float(self._observed - self._learned),
                max_policy_lag=float(self._max_lag),
                overlapped=float(self.asynchronous),
                local_acting=1.0,
            )
        return out

    def restart(self, state: Mapping[str, Any] | None) -> None:
        """Replace the actor with one loaded from ``state``; the copy reloads ``state`` too (or starts
        afresh when there is none), so both continue from the same agent."""
        self.remote.restart(state)
        with self._apply_lock:
            if state is None:
                self.replica = self._build_replica(self.remote.spec)
            else:
                self.replica.load_state_dict(state)
            self._reset_replies(version=0 if state is None else -1)

    def close(self) -> None:
        """Kill the actor (transitions in flight are dropped) and stop the reply thread."""
        self.remote.close()
        with self._cond:
            self._closed = True
            self._inflight.clear()
            self._cond.notify_all()
        if self._applier is not None:
            self._applier.join(timeout=30)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # locks, the thread and the replies in flight do not travel
        for name in ("_cond", "_apply_lock", "_applier", "_inflight", "_error"):
            state.pop(name, None)
        state["_polled"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_sync()
        self._reset_replies(version=self._version)


def _wait_name_free(name: str, namespace: str | None, timeout_s: float = 10.0) -> None:
    """Wait until a killed named actor's name is released, so its replacement can take it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:  # no live actor holds the name
            return
        time.sleep(0.05)
    raise TimeoutError(f"agent actor name {name!r} still taken {timeout_s} s after the old actor was killed")
