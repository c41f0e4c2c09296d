"""The ``Mixer`` protocol every data-mixing agent implements, the kind registry, and ``build_mixer``.

Dimension legend: K = domains, S = observation features, B = batch.

A mixer maps the env's observation to the next mixture ``weights_K`` on the probability simplex with
every weight at least ``floor``; it learns from ``observe`` (one transition per env step) and ``update``.
Agents see numpy arrays and gymnasium spaces only: they never import ``envs``. What an env step
tells an agent travels as a typed ``Transition`` (built from ``DataMixingEnv.step``'s return by
``Transition.from_step``, the one place that reads the env's ``info`` keys).

Agents are single-threaded: concurrency (the learner Ray actor and the acting copy on rank 0) belongs
to ``ray_jobs.agent_actor``. A mixer whose ``policy`` is a network (AC-ODM) is what that layer runs
as a learner actor plus an acting copy; every other mixer runs in-process.

Typical loop (the in-process driver does this)::

    mixer = build_mixer(cfg.agent, env.observation_space, env.action_space, seed=cfg.seed,
                        domain_names=names, natural_weights=natural_K, total_steps=num_decisions,
                        floor=cfg.env.action_floor)
    weights_K = mixer.act(obs, explore=True)
    next_obs, reward, terminated, truncated, info = env.step(weights_K)
    mixer.observe(Transition.from_step(obs, weights_K, reward, next_obs, info))
    metrics = mixer.update()
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from gymnasium import spaces

from agents.config import AgentConfig

log = logging.getLogger(__name__)

# Modules whose classes register themselves; imported lazily by ``build_mixer`` (no import cycle).
_IMPLEMENTATION_MODULES = ("agents.ac_odm", "agents.greedy", "agents.odm", "agents.static")
_REGISTRY: dict[str, type[BaseMixer]] = {}


@dataclass(frozen=True)
class Transition:
    """One env step as every agent sees it.

    Attributes:
        obs: the observation the mixture was chosen from (S,).
        weights: the mixture the env applied (K,), after its own projection.
        reward: the env's scalar reward.
        reward_K: the reward's K per-domain parts (AC-ODM's critic heads).
        next_obs: the observation after the step (S,).
        valid: False when the reward is a placeholder (no Gram matrix, a skipped LM step): learners
            that fit rewards drop the transition.
        skipped: the LM skipped its optimiser step (non-finite loss or gradient).
        loss_K: per-domain train loss, NaN for a domain absent from the step (the ODM bandits' signal).
        gram_KK: the step's raw K x K gradient Gram matrix (mirror descent), None without a probe.
        reward_gram_KK: the Gram matrix the reward was scored under, diagonal debiased (greedy).
        microbatches_K: micro-batches per domain in the step (which domains were present).
        target_mask_K: the domains whose validation loss the run optimises.
    """

    obs: np.ndarray
    weights: np.ndarray
    reward: float
    reward_K: np.ndarray
    next_obs: np.ndarray
    valid: bool = True
    skipped: bool = False
    loss_K: np.ndarray | None = None
    gram_KK: np.ndarray | None = None
    reward_gram_KK: np.ndarray | None = None
    microbatches_K: np.ndarray | None = None
    target_mask_K: np.ndarray | None = None

    @classmethod
    def from_step(
        cls, obs: np.ndarray, weights: np.ndarray, reward: float, next_obs: np.ndarray, info: Mapping[str, Any]
    ) -> Transition:
        """The transition of ``DataMixingEnv.step``: ``weights`` is the action sent, replaced by the
        applied ``info["weights_K"]`` when present; the other fields come from the ``info`` keys of
        the same names (``reward_parts_K`` for ``reward_K``; zeros when absent, ``valid`` then False)."""
        num_domains = len(np.asarray(weights))

        def vector(key: str) -> np.ndarray | None:
            value = info.get(key)
            return None if value is None else np.array(value, dtype=np.float64)

        reward_K = vector("reward_parts_K")
        return cls(
            obs=np.array(obs, dtype=np.float32),
            weights=np.array(info.get("weights_K", weights), dtype=np.float64),
            reward=float(reward),
            reward_K=np.zeros(num_domains) if reward_K is None else reward_K,
            next_obs=np.array(next_obs, dtype=np.float32),
            valid=reward_K is not None and bool(info.get("reward_valid", True)) and not bool(info.get("skipped", False)),
            skipped=bool(info.get("skipped", False)),
            loss_K=vector("loss_K"),
            gram_KK=vector("gram_KK"),
            reward_gram_KK=vector("reward_gram_KK"),
            microbatches_K=None if info.get("microbatches_K") is None else np.array(info["microbatches_K"]),
            target_mask_K=None if info.get("target_mask_K") is None else np.array(info["target_mask_K"], dtype=bool),
        )


@runtime_checkable
class Mixer(Protocol):
    """What the driver, the Ray actor and any Gymnasium client may call on a mixing agent."""

    kind: str
    domain_names: list[str]

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The next mixture ``weights_K``: on the simplex, every weight >= the floor."""
        ...

    def observe(self, transition: Transition) -> None:
        """Record one env step."""
        ...

    def update(self) -> dict[str, float]:
        """Learn from what was observed; returns namespaced metrics (``agent/...``), maybe empty."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (a deep copy; safe to ``torch.save``)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a state of another K or observation size is rejected."""
        ...


def register_mixer(*kinds: str) -> Callable[[type[BaseMixer]], type[BaseMixer]]:
    """Class decorator: make ``build_mixer`` construct this class for each ``agent.kind`` in ``kinds``."""

    def wrap(cls: type[BaseMixer]) -> type[BaseMixer]:
        for kind in kinds:
            if kind in _REGISTRY and _REGISTRY[kind] is not cls:
                raise ValueError(f"mixer kind {kind!r} is already registered to {_REGISTRY[kind].__name__}")
            _REGISTRY[kind] = cls
        return cls

    return wrap


def mixer_kinds() -> list[str]:
    """The registered ``agent.kind`` values, sorted."""
    _import_implementations()
    return sorted(_REGISTRY)


def _import_implementations() -> None:
    for module in _IMPLEMENTATION_MODULES:
        importlib.import_module(module)


def mixer_learns(kind: str) -> bool:
    """Whether the mixer registered as ``kind`` learns from transitions (``BaseMixer.learns``).

    Raises:
        ValueError: ``kind`` is not a registered mixer.
    """
    return bool(_mixer_class(kind).learns)


def _mixer_class(kind: str) -> type[BaseMixer]:
    _import_implementations()
    if kind not in _REGISTRY:
        raise ValueError(f"agent.kind = {kind!r} is not a known mixer; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind]


def build_mixer(
    config: AgentConfig,
    observation_space: spaces.Space,
    action_space: spaces.Space,
    *,
    seed: int,
    domain_names: Sequence[str],
    natural_weights: np.ndarray | None = None,
    total_steps: int,
    floor: float = 0.0,
) -> BaseMixer:
    """Construct the mixer that ``config.kind`` names.

    Args:
        config: the agent's config (``ExperimentConfig.agent``).
        observation_space: the env's 1-D ``Box`` observation space (S features).
        action_space: the env's ``Box`` action space of shape (K,).
        seed: seeds every random draw the mixer makes (network init, exploration, replay sampling).
        domain_names: the K domain names in corpus order (index i is domain i in weights and heads).
        natural_weights: token-proportional mixture (K,) from the manifest; needed by ``natural``, and
            used as the ODM bandits' initial distribution when given.
        total_steps: decisions (``env.step`` calls) in the run; sets the warmup length and LR schedules.
        floor: minimum weight per domain (``env.action_floor``); must be in [0, 1/K).

    Raises:
        ValueError: unknown ``kind``, a floor >= 1/K, or spaces/names/weights that disagree on K.
    """
    _import_implementations()
    kind = getattr(config, "kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"agent.kind = {kind!r} is not a known mixer; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind](
        config,
        observation_space,
        action_space,
        seed=seed,
        domain_names=domain_names,
        natural_weights=natural_weights,
        total_steps=total_steps,
        floor=floor,
    )


def project_to_simplex(weights_K: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Euclidean projection onto ``{w : w_i >= floor, sum(w) = 1}`` (float64).

    Idempotent: a vector already on the floored simplex comes back unchanged, so the env's own
    projection of an agent's action is a no-op. The excess mass needed to lift small weights to the
    floor is taken from the largest weights (sort-based projection, Duchi et al. 2008).

    Raises:
        ValueError: non-finite entries, a non-1-D input, or a floor outside [0, 1/K].
    """
    w_K = np.asarray(weights_K, dtype=np.float64)
    if w_K.ndim != 1 or w_K.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {w_K.shape}")
    if not np.all(np.isfinite(w_K)):
        raise ValueError(f"weights must be finite, got {w_K.tolist()}")
    num_domains = w_K.size
    budget = 1.0 - num_domains * floor  # mass left above the floor
    if floor < 0 or budget < -1e-12:
        raise ValueError(
            f"floor={floor} must be in [0, 1/K] = [0, {1 / num_domains:.6g}] for K={num_domains}"
        )
    if budget <= 0:
        return np.full(num_domains, 1.0 / num_domains)
    if w_K.min() >= floor and abs(w_K.sum() - 1.0) <= 1e-12:
        return w_K.copy()  # already feasible: exactly unchanged (no round-off from the shift below)
    v_K = w_K - floor
    u_K = np.sort(v_K)[::-1]
    cumsum_K = np.cumsum(u_K) - budget
    rho = np.nonzero(u_K - cumsum_K / np.arange(1, num_domains + 1) > 0)[0][-1]
    theta = cumsum_K[rho] / (rho + 1)
    return np.maximum(v_K - theta, 0.0) + floor


def exploration_epsilon(num_domains: int, t: int) -> float:
    """ODM's exploration rate ``eps_t = min(1/K, sqrt(ln K / (K t)))`` for update ``t >= 1``."""
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * t)))


class BaseMixer:
    """Shared constructor checks and array validation for every mixer (subclasses register a kind).

    Attributes:
        config: the ``AgentConfig``.
        num_domains: K, from ``action_space.shape``.
        obs_dim: S, from ``observation_space.shape``.
        domain_names: the K names, in corpus order.
        floor: minimum weight per domain.
        total_steps: decisions in the run.
    """

    kind: str = "base"
    # False for a mixer that never changes its mixture from what it observes (the static ones).
    learns: bool = True

    def __init__(
        self,
        config: AgentConfig,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        *,
        seed: int,
        domain_names: Sequence[str],
        natural_weights: np.ndarray | None = None,
        total_steps: int,
        floor: float = 0.0,
    ) -> None:
        if not isinstance(config, AgentConfig):
            raise TypeError(f"config must be an AgentConfig, got {type(config).__name__}")
        self.config = config
        self.kind = config.kind
        self.num_domains = _box_size(action_space, "action_space")
        self.obs_dim = _box_size(observation_space, "observation_space")
        self.action_dtype = (
            np.dtype(action_space.dtype) if action_space.dtype.kind == "f" else np.dtype("float64")
        )
        names = [str(n) for n in domain_names]
        if len(names) != self.num_domains:
            raise ValueError(
                f"domain_names has {len(names)} names but action_space has K={self.num_domains} domains"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"domain_names must be unique, got {names}")
        self.domain_names = names
        if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if not isinstance(total_steps, int | np.integer) or total_steps <= 0:
            raise ValueError(
                f"total_steps must be a positive int (decisions in the run), got {total_steps!r}"
            )
        self.total_steps = int(total_steps)
        if not (math.isfinite(floor) and 0.0 <= floor < 1.0 / self.num_domains):
            raise ValueError(
                f"floor={floor} must be in [0, 1/K) = [0, {1 / self.num_domains:.6g}) for K={self.num_domains}"
                " domains (env.action_floor)"
            )
        self.floor = float(floor)
        self.natural_weights_K = (
            None if natural_weights is None else self._check_distribution(natural_weights)
        )

    @property
    def policy(self) -> Any:
        """The network ``act`` reads (a ``torch.nn.Module``), or None for a mixer without one.

        A mixer with a policy network trains it in ``update`` and its ``act`` depends on the rest of its
        state only through what ``observe`` records. So a copy that observes the same transitions and
        loads the learner's ``policy.state_dict()`` acts as the learner would: what the Ray layer's
        learner actor and acting copy rely on.
        """
        return None

    # -- helpers for subclasses ----------------------------------------------------------------------
    def _check_distribution(self, weights_K: np.ndarray, name: str = "natural_weights") -> np.ndarray:
        w_K = np.asarray(weights_K, dtype=np.float64)
        if w_K.shape != (self.num_domains,):
            raise ValueError(f"{name} must have shape ({self.num_domains},), got {w_K.shape}")
        if not np.all(np.isfinite(w_K)) or np.any(w_K < 0) or w_K.sum() <= 0:
            raise ValueError(f"{name} must be finite, >= 0 and have a positive sum, got {w_K.tolist()}")
        return w_K / w_K.sum()

    def _check_obs(self, obs: np.ndarray, name: str = "obs") -> np.ndarray:
        obs_S = np.asarray(obs, dtype=np.float32)
        if obs_S.shape != (self.obs_dim,):
            raise ValueError(f"{name} must have shape ({self.obs_dim},), got {obs_S.shape}")
        return obs_S

    def _check_weights(self, weights: np.ndarray) -> np.ndarray:
        w_K = np.asarray(weights, dtype=np.float64)
        if w_K.shape != (self.num_domains,) or not np.all(np.isfinite(w_K)):
            raise ValueError(f"weights must be {self.num_domains} finite values, got {np.asarray(weights)!r}")
        return w_K

    def _check_vector(self, value: np.ndarray | None, name: str) -> np.ndarray:
        if value is None:
            raise ValueError(f"{type(self).__name__} needs transition.{name} (a ({self.num_domains},) array)")
        v_K = np.asarray(value, dtype=np.float64)
        if v_K.shape != (self.num_domains,):
            raise ValueError(f"transition.{name} must have shape ({self.num_domains},), got {v_K.shape}")
        return v_K

    def _finish(self, weights_K: np.ndarray) -> np.ndarray:
        """Project onto the floored simplex and cast to the action space's dtype."""
        return project_to_simplex(weights_K, self.floor).astype(self.action_dtype)

    def _header(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_domains": self.num_domains,
            "obs_dim": self.obs_dim,
            "domain_names": list(self.domain_names),
        }

    def _check_header(self, state: Mapping[str, Any]) -> None:
        got = {k: state.get(k) for k in ("kind", "num_domains", "obs_dim", "domain_names")}
        if got != self._header():
            raise ValueError(f"state is for {got}, but this mixer is {self._header()}")


def _box_size(space: spaces.Space, name: str) -> int:
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise TypeError(f"{name} must be a 1-D gymnasium Box, got {space!r}")
    return int(space.shape[0])
