"""``DataMixingEnv``: LM pretraining as a Gymnasium environment (registered as ``acodm/DataMixing-v0``).

Dimension legend: K = domains, L = monitored layers, S = observation features (3K + 2L + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.backends import LMBackend, TrainerBackend
from envs.config import EnvConfig, PretrainConfig
from envs.observation import ObservationState, build_observation, observation_bounds
from envs.rewards import GramAverage, compute_reward
from envs.signals import TrainSignals
from envs.simulated import SimulatedBackend, SimulatedConfig, SimulatedDomain

STATE_VERSION = 1
ENV_ID = "acodm/DataMixing-v0"


def project_action(action_K: np.ndarray, floor: float) -> np.ndarray:
    """Map an action to mixture weights: clip at 0, normalise, then mix with the floor if needed.

    ``p = max(a, 0) / sum(max(a, 0))`` (uniform when every entry is <= 0). If every ``p_i >= floor``
    the mixture is used as is (so a mixer that already respects the floor, as every acodm mixer
    does, gets exactly the weights it chose); otherwise ``w = floor + (1 - K floor) p``. Every weight
    is >= ``floor``, the weights sum to 1, and scaling the action does not change the mixture.

    Raises:
        ValueError: ``K * floor >= 1``.
    """
    a = np.clip(np.asarray(action_K, dtype=np.float64), 0.0, None)
    k = a.shape[0]
    if floor * k >= 1:
        raise ValueError(f"action floor {floor} must be < 1/K = {1 / k:.4g} for K={k} domains")
    total = a.sum()
    p = a / total if total > 0 else np.full(k, 1.0 / k)
    if p.min() >= floor:
        return p
    return floor + (1.0 - k * floor) * p


@dataclass(frozen=True, eq=False)
class StepSignals(TrainSignals):
    """The ``TrainSignals`` in ``info["signals"]``, with a value equality Gymnasium can use.

    Two records are equal when every measured field is equal (arrays element-wise, NaN equal to NaN);
    the wall-clock ``timings`` describe the host, not the run, and are ignored. This lets
    ``check_env``'s step-determinism check compare infos.
    """

    @classmethod
    def of(cls, signals: TrainSignals) -> StepSignals:
        """Copy ``signals`` into a ``StepSignals``."""
        return cls(**{f.name: getattr(signals, f.name) for f in fields(TrainSignals)})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainSignals):
            return NotImplemented
        for f in fields(TrainSignals):
            if f.name == "timings":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or not np.array_equal(a, b, equal_nan=True):
                    return False
            elif not (
                a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))
            ):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def _simulated_from_experiment(config: PretrainConfig) -> SimulatedConfig:
    """A simulation mirroring an experiment's domains: non-target domains become junk, equal sizes."""
    domains = [
        SimulatedDomain(
            name=d.name,
            alignment=0.35 if d.target else -0.6,
            size_tokens=4_000_000,
            init_loss=6.0 if d.target else 9.0,
            floor_loss=3.0 if d.target else 8.6,
            target=d.target,
        )
        for d in config.data.domains
    ]
    return SimulatedConfig(domains=domains, total_steps=config.train.total_steps)


def _mean_gram(grams: list[np.ndarray | None]) -> np.ndarray | None:
    """The mean of the steps' reward Gram matrices (those that exist); None when none does."""
    present = [g for g in grams if g is not None]
    return np.mean(present, axis=0) if present else None


class DataMixingEnv(gym.Env[np.ndarray, np.ndarray]):
    """Choose the data mixture of the next optimiser step(s) of an LM pretraining run.

    ## Description

    Each ``step`` trains a language model for ``env.steps_per_action`` optimiser steps on micro-batches
    drawn from K data domains with the chosen mixture weights, and observes per-domain losses,
    micro-batch counts, monitored weight norms and the Gram matrix of per-domain gradients (AC-ODM,
    Actor-Critic Online Data Mixing). The run behind it is a backend: ``SimulatedBackend`` (an analytic
    model, milliseconds a step; the default) or ``LMBackend`` (a GPT-NeoX ``Pretrainer``).

    ## Domains

    ``env.domain_names`` (from ``config.data.domains``, or the simulation's). Index i is domain i in
    actions, observations, rewards and ``info``. ``target_mask_K`` marks domains counted in validation
    summaries; ``natural_weights_K`` are the training token shares.

    ## Action Space

    ``Box(0, 1, (K,), float32)``. The action is projected to the simplex with a floor
    (``project_action``): clip at 0, normalise (uniform if all zero), then
    ``w = floor + (1 - K floor) p`` with ``floor = env.action_floor``.

    ## Observation Space

    ``Box((3K + 2L + 1,), float32)``; z-scores are over domains (or layers), clamped to ``±clamp``:

    | index           | observation                                        | min    | max            |
    |-----------------|----------------------------------------------------|--------|----------------|
    | 0 .. K-1        | per-domain train loss (z-score)                    | -clamp | clamp          |
    | K .. 2K-1       | its change since the previous step (z-score)       | -clamp | clamp          |
    | 2K .. 3K-1      | micro-batches per domain this step (z-score)       | -clamp | clamp          |
    | 3K .. 3K+L-1    | monitored weight norms (z-score over layers)       | -clamp | clamp          |
    | 3K+L .. 3K+2L-1 | norm of their change this step (z-score)           | -clamp | clamp          |
    | 3K+2L           | progress: optimiser steps done / budget            | 0      | 1 (100 ``ref``)|

    ``env.observation_mode: reference`` uses changes since the first step and progress in [0, 100]
    (the reference's features); see ``envs.observation`` for the missing-value rule.

    ## Rewards

    From the Gram matrix of per-domain gradients (``envs.rewards``). ``reward_mode: direction``
    (default): the cosine between the step's update ``sum_i m_i g_i`` (``m`` the realised micro-batch
    shares) and the mean target gradient, with per-domain parts summing to it; ``quadratic``: a
    second-order model of the target loss decrease; ``mixture``: ``r = <w, s>`` with alignment scores
    ``s``; ``reference``: parts ``s_i``, ``r`` their mean. With ``steps_per_action > 1`` the reward, scores and parts are means over the steps. A skipped
    (non-finite) LM step contributes 0.

    ## Starting State

    ``reset(seed)`` starts a fresh run (new model, optimiser and sampler, or a new simulation) from a
    seed drawn from ``self.np_random``; the first observation has zero loss features, the initial
    weight norms and progress 0.

    ## Episode End

    Never ``terminated``. ``truncated`` when the training budget (``train.total_steps`` optimiser
    steps) is spent; the last action runs only the steps left. Stepping again needs ``reset()``.

    ## Info

    ``weights_K`` (the projected mixture), ``loss_K`` (per-domain train loss, NaN if absent),
    ``scores_K``, ``raw_scores_K``, ``reward_parts_K``, ``reward_valid``, ``gram_KK`` (the last step's),
    ``reward_gram_KK`` (the step's debiased Gram matrix, before smoothing; mean over the action's steps),
    ``microbatches_K`` (over the action's steps), ``target_mask_K``, ``raw_features``
    (un-normalised observation features), ``signals`` (the last step's ``TrainSignals``, as
    ``StepSignals``), ``step_signals`` (all of this action's), ``step`` and ``skipped``. Validation is
    not run by ``step``: call ``env.evaluate()`` on the driver's schedule (every rank, under DDP).

    ## Arguments

    ``gymnasium.make("acodm/DataMixing-v0")`` builds the default simulation. Arguments:

    - ``config``: a ``PretrainConfig`` (an experiment's ``ExperimentConfig`` is one: load a YAML file
      with ``ray_jobs.config.load_config`` first). Required for ``lm``; for ``simulated`` it makes the
      simulation mirror its domains and budget.
    - ``backend``: ``"simulated"`` (default), ``"lm"`` or a ``TrainerBackend`` instance.
    - ``env_config``: an ``EnvConfig``; default ``config.env`` or ``EnvConfig()``.
    - ``simulated``: a ``SimulatedConfig`` for the simulated backend.
    - ``device``: the LM's device (``lm`` only).

    ## Version History

    - v0: AC-ODM observation with step-to-step changes and progress in [0, 1]; reward modes
      ``direction`` (default), ``quadratic``, ``mixture`` and ``reference``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        config: PretrainConfig | None = None,
        backend: str | TrainerBackend = "simulated",
        *,
        env_config: EnvConfig | None = None,
        simulated: SimulatedConfig | None = None,
        device: Any = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"DataMixingEnv has no render modes; got render_mode={render_mode!r}")
        if config is not None and not isinstance(config, PretrainConfig):
            raise TypeError(
                f"config must be a PretrainConfig (or an ExperimentConfig, which is one), got {type(config).__name__}; "
                "load a YAML file with ray_jobs.config.load_config(path) first"
            )
        self.env_config = env_config or (config.env if config is not None else EnvConfig())
        self.backend = self._make_backend(config, backend, simulated, device)
        self.domain_names = list(self.backend.domain_names)
        self.target_mask_K = np.asarray(self.backend.target_mask_K, dtype=bool).copy()
        self.natural_weights_K = np.asarray(self.backend.natural_weights_K, dtype=np.float64).copy()
        self.total_steps = int(self.backend.total_steps)
        self.num_domains = len(self.domain_names)
        self.num_layers = int(self.backend.num_monitored_layers)
        if self.env_config.action_floor * self.num_domains >= 1:
            raise ValueError(
                f"env.action_floor={self.env_config.action_floor} must be < 1/K = {1 / self.num_domains:.4g}"
            )
        low, high = observation_bounds(
            self.num_domains,
            self.num_layers,
            clamp=self.env_config.clamp,
            mode=self.env_config.observation_mode,
        )
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (self.num_domains,), dtype=np.float32)
        self._obs_state = ObservationState()
        self._gram_average = self._new_gram_average()
        self._steps_done = 0
        self._needs_reset = True

    def _new_gram_average(self) -> GramAverage | None:
        beta = self.env_config.reward_smoothing
        if beta <= 0 or self.env_config.reward_mode not in ("direction", "quadratic"):
            return None
        return GramAverage(self.num_domains, beta)

    def _make_backend(
        self, config: PretrainConfig | None, backend: str | TrainerBackend, simulated: SimulatedConfig | None, device: Any
    ) -> TrainerBackend:
        baseline = "initial" if self.env_config.observation_mode == "reference" else "previous"
        if not isinstance(backend, str):
            if not isinstance(backend, TrainerBackend):
                raise TypeError(
                    f"backend must be 'simulated', 'lm' or a TrainerBackend, got {type(backend).__name__}"
                )
            return backend
        if backend == "simulated":
            if simulated is None and config is not None:
                simulated = _simulated_from_experiment(config)
            return SimulatedBackend(simulated, delta_baseline=baseline)
        if backend == "lm":
            if config is None:
                raise ValueError("backend='lm' needs config= (a PretrainConfig or an ExperimentConfig)")
            if simulated is not None:
                raise ValueError("simulated= applies to backend='simulated' only")
            return LMBackend(config, device=device, delta_baseline=baseline)
        raise ValueError(f"backend must be 'simulated', 'lm' or a TrainerBackend instance, got {backend!r}")

    # ------------------------------------------------------------------ helpers
    def _observe(self, signals: TrainSignals) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = self.env_config
        obs, raw, self._obs_state = build_observation(
            signals,
            self._obs_state,
            num_layers=self.num_layers,
            total_steps=self.total_steps,
            clamp=cfg.clamp,
            mode=cfg.observation_mode,
        )
        return obs, raw

    # ------------------------------------------------------------------ Gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new run; the backend's seed is drawn from ``self.np_random``."""
        super().reset(seed=seed)
        if options:
            raise ValueError(f"DataMixingEnv.reset takes no options, got {sorted(options)}")
        backend_seed = int(self.np_random.integers(0, 2**31 - 1))
        signals = self.backend.reset(backend_seed)
        self._obs_state = ObservationState()
        self._gram_average = self._new_gram_average()
        self._steps_done = 0
        self._needs_reset = False
        obs, raw = self._observe(signals)
        return obs, {
            "weights_K": np.asarray(signals.weights_K, dtype=np.float64).copy(),
            "raw_features": raw,
            "step": 0,
        }

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Train ``steps_per_action`` optimiser steps on the projected mixture (class docstring)."""
        if self._needs_reset:
            raise RuntimeError(
                "DataMixingEnv.step called before reset() or after the episode ended "
                f"(budget {self.total_steps} optimiser steps); call reset()"
            )
        action_K = np.asarray(action, dtype=np.float64)
        if action_K.shape != (self.num_domains,) or not np.all(np.isfinite(action_K)):
            raise ValueError(f"action must be {self.num_domains} finite numbers, got {action!r}")
        weights_K = project_action(action_K, self.env_config.action_floor)
        num = min(self.env_config.steps_per_action, self.total_steps - self._steps_done)
        history, results = [], []
        for _ in range(num):
            signals = self.backend.step(weights_K.copy())
            history.append(StepSignals.of(signals))
            results.append(
                compute_reward(
                    signals,
                    mode=self.env_config.reward_mode,
                    clamp=self.env_config.clamp,
                    target_mask_K=self.target_mask_K,
                    curvature=self.env_config.reward_curvature,
                    debias=self.env_config.debias_gram,
                    average=self._gram_average,
                )
            )
        self._steps_done += num
        last = history[-1]
        obs, raw = self._observe(last)
        truncated = self._steps_done >= self.total_steps
        self._needs_reset = truncated
        info = {
            "weights_K": weights_K,
            "loss_K": np.asarray(last.loss_K, dtype=np.float64).copy(),
            "scores_K": np.mean([r.scores_K for r in results], axis=0),
            "raw_scores_K": np.mean([r.raw_scores_K for r in results], axis=0),
            "reward_parts_K": np.mean([r.parts_K for r in results], axis=0),
            "reward_valid": all(r.valid for r in results),
            "gram_KK": None if last.gram_KK is None else np.asarray(last.gram_KK).copy(),
            "reward_gram_KK": _mean_gram([r.gram_KK for r in results]),
            "microbatches_K": np.sum([s.microbatches_K for s in history], axis=0),
            "target_mask_K": self.target_mask_K.copy(),
            "raw_features": raw,
            "signals": last,
            "step_signals": tuple(history),
            "step": self._steps_done,
            "skipped": any(s.skipped for s in history),
        }
        reward = float(np.mean([r.reward for r in results]))
        return obs, reward, False, truncated, info

    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current model (delegates to the backend)."""
        if self._needs_reset and self._steps_done == 0:
            raise RuntimeError("DataMixingEnv.evaluate called before reset()")
        return self.backend.evaluate()

    def close(self) -> None:
        """Free the backend's model; calling it twice is fine."""
        self.backend.close()
        self._needs_reset = True

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        """Env and backend state for exact resume (plain values; tensors only inside the LM backend).

        Like ``torch.nn.Module.state_dict``, the LM backend's tensors are live references: serialise
        (or deep-copy) the result before stepping again.
        """
        if self._needs_reset and self._steps_done == 0:
            raise RuntimeError("DataMixingEnv.state_dict called before reset()")
        return {
            "version": STATE_VERSION,
            "domain_names": list(self.domain_names),
            "np_random": self.np_random.bit_generator.state,
            "observation": self._obs_state.state_dict(),
            "gram_average": None if self._gram_average is None else self._gram_average.state_dict(),
            "steps_done": self._steps_done,
            "needs_reset": self._needs_reset,
            "backend": self.backend.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the next ``step`` continues the saved run exactly."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a DataMixingEnv state of version {STATE_VERSION} (found {state.get('version')!r})"
            )
        if state["domain_names"] != self.domain_names:
            raise ValueError(
                f"saved env domains {state['domain_names']} differ from this env's {self.domain_names}"
            )
        self.backend.load_state_dict(state["backend"])
        rng_state = state["np_random"]
        rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
        rng.bit_generator.state = rng_state
        self._np_random = rng
        self._obs_state = ObservationState.from_state_dict(state["observation"])
        self._gram_average = self._new_gram_average()
        if self._gram_average is not None and state.get("gram_average") is not None:
            self._gram_average.load_state_dict(state["gram_average"])
        self._steps_done = int(state["steps_done"])
        self._needs_reset = bool(state["needs_reset"])


# Importing ``envs`` registers the id with a string entry point; registering here too (idempotent)
# makes ``gymnasium.make(ENV_ID)`` work for code that imported only ``envs.env``.
if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.env:DataMixingEnv")
