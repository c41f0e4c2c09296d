"""The AC-ODM observation: a pure function of ``TrainSignals`` and a small previous-step state.

Dimension legend: K = domains, L = monitored layers, S = observation features (3K + 2L + 1).

Layout (docs/reference.md, R2, in the reference's order)::

    [0, K)            loss        per-domain train loss, z-scored over domains, clamped
    [K, 2K)           loss change its change, z-scored, clamped
    [2K, 3K)          counts      micro-batches per domain this step, z-scored, clamped
    [3K, 3K+L)        weight norm Frobenius norm of each monitored weight, z-scored over layers, clamped
    [3K+L, 3K+2L)     weight change norm of the change of each monitored weight, z-scored, clamped
    3K+2L             progress    optimiser steps done / budget

Z-scores use the unbiased std plus 1e-8 (``envs.rewards.zscore``); fewer than two entries give zeros.
Modes (``EnvConfig.observation_mode``):

- ``default``: changes are step-to-step (loss now minus loss at the previous observation; the weight
  change is the norm of this step's update, ``TrainSignals.weight_delta_norms_L``) and progress lies
  in [0, 1].
- ``reference``: reproduces the reference's quirks for comparison: loss change since the first step
  (bug B8), the weight change since the start of training (the backend then reports
  ``||W_t - W_0||`` in ``weight_delta_norms_L``), and progress scaled to [0, 100] (B9).

Missing values (stated rule): a domain with no micro-batch this step has a NaN loss; the observation
carries that domain's last finite loss forward (so its change is 0). A domain never seen yet takes the
mean of this step's known losses (z-score 0). Non-finite weight norms are carried forward the same
way (0 before any finite value). The observation is therefore always finite and inside its bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from envs.rewards import zscore
from envs.signals import TrainSignals

ObservationMode = Literal["default", "reference"]


def observation_size(num_domains: int, num_layers: int) -> int:
    """S = 3K + 2L + 1."""
    return 3 * num_domains + 2 * num_layers + 1


def observation_bounds(
    num_domains: int, num_layers: int, *, clamp: float, mode: ObservationMode = "default"
) -> tuple[np.ndarray, np.ndarray]:
    """``(low_S, high_S)`` as float32: ``±clamp`` for z-scored features, [0, 1] or [0, 100] for progress."""
    size = observation_size(num_domains, num_layers)
    low = np.full(size, -clamp, dtype=np.float32)
    high = np.full(size, clamp, dtype=np.float32)
    low[-1] = 0.0
    high[-1] = 100.0 if mode == "reference" else 1.0
    return low, high


@dataclass(frozen=True)
class ObservationState:
    """What the observation remembers between steps; part of the env's state (see ``state_dict``).

    Attributes:
        last_loss_K: the filled per-domain loss of the previous observation (NaN = never seen).
        first_loss_K: the filled per-domain loss of the first step (reference mode's baseline).
        last_weight_norms_L: last finite monitored weight norms.
        last_weight_delta_norms_L: last finite monitored weight change norms.
    """

    last_loss_K: np.ndarray | None = None
    first_loss_K: np.ndarray | None = None
    last_weight_norms_L: np.ndarray | None = None
    last_weight_delta_norms_L: np.ndarray | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of lists (None where unset), for checkpoints."""
        return {k: (None if v is None else np.asarray(v).tolist()) for k, v in self.__dict__.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ObservationState:
        """Inverse of ``state_dict``; unknown keys are an error."""
        unknown = set(state) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"observation state has unknown keys {sorted(unknown)}")
        return cls(**{k: (None if v is None else np.asarray(v, dtype=np.float64)) for k, v in state.items()})


def _fill(values: np.ndarray, previous: np.ndarray | None, default: float | None) -> np.ndarray:
    """Replace non-finite entries by ``previous`` (where finite), then by ``default`` (or the mean)."""
    out = np.asarray(values, dtype=np.float64).copy()
    bad = ~np.isfinite(out)
    if previous is not None and bad.any():
        prev = np.asarray(previous, dtype=np.float64)
        take = bad & np.isfinite(prev)
        out[take] = prev[take]
        bad = ~np.isfinite(out)
    if bad.any():
        good = out[~bad]
        out[bad] = default if default is not None else (good.mean() if good.size else 0.0)
    return out


def _vector(values: np.ndarray | None, size: int, name: str) -> np.ndarray:
    if values is None:
        return np.full(size, np.nan)
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (size,):
        raise ValueError(f"signals.{name} must have shape ({size},), got {arr.shape}")
    return arr


def build_observation(
    signals: TrainSignals,
    state: ObservationState,
    *,
    num_layers: int,
    total_steps: int,
    clamp: float = 3.0,
    mode: ObservationMode = "default",
) -> tuple[np.ndarray, dict[str, np.ndarray | float], ObservationState]:
    """Build the observation of one step.

    Args:
        signals: the step's signals (a step-0 record with NaN losses at reset).
        state: what the previous observation left (``ObservationState()`` at the start).
        num_layers: L, the monitored layers (``weight_norms_L`` may be None when L = 0).
        total_steps: the training budget, for progress.
        clamp: z-score clamp.
        mode: ``default`` or ``reference`` (module docstring).

    Returns:
        ``(obs_S, raw_features, new_state)``: the float32 observation, the un-normalised features
        (``loss_K``, ``loss_change_K``, ``microbatches_K``, ``weight_norms_L``,
        ``weight_delta_norms_L``, ``progress``) and the state for the next call.
    """
    if mode not in ("default", "reference"):
        raise ValueError(f"observation mode must be 'default' or 'reference', got {mode!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    k = signals.num_domains
    loss = _fill(_vector(signals.loss_K, k, "loss_K"), state.last_loss_K, None)
    if state.last_loss_K is None and not np.isfinite(np.asarray(signals.loss_K, dtype=np.float64)).any():
        # Nothing measured yet (the reset record): keep "never seen" so the first real step fills it.
        new_last_loss = None
        loss_change = np.zeros(k)
    else:
        new_last_loss = loss
        baseline = state.first_loss_K if mode == "reference" else state.last_loss_K
        loss_change = np.zeros(k) if baseline is None else loss - baseline
    first_loss = state.first_loss_K
    if first_loss is None and new_last_loss is not None:
        first_loss = new_last_loss

    counts = _vector(signals.microbatches_K, k, "microbatches_K")
    norms = _fill(
        _vector(signals.weight_norms_L, num_layers, "weight_norms_L"), state.last_weight_norms_L, 0.0
    )
    deltas = _fill(
        _vector(signals.weight_delta_norms_L, num_layers, "weight_delta_norms_L"),
        state.last_weight_delta_norms_L,
        0.0,
    )
    progress = float(np.clip(signals.step / total_steps, 0.0, 1.0))
    if mode == "reference":
        progress *= 100.0

    obs = np.concatenate(
        [
            zscore(loss, clamp),
            zscore(loss_change, clamp),
            zscore(np.nan_to_num(counts), clamp),
            zscore(norms, clamp),
            zscore(deltas, clamp),
            [progress],
        ]
    ).astype(np.float32)
    raw: dict[str, np.ndarray | float] = {
        "loss_K": loss,
        "loss_change_K": loss_change,
        "microbatches_K": np.nan_to_num(counts),
        "weight_norms_L": norms,
        "weight_delta_norms_L": deltas,
        "progress": progress,
    }
    # The state keeps its own copies: callers may mutate the returned features.
    new_state = replace(
        state,
        last_loss_K=None if new_last_loss is None else new_last_loss.copy(),
        first_loss_K=None if first_loss is None else first_loss.copy(),
        last_weight_norms_L=norms.copy() if num_layers else state.last_weight_norms_L,
        last_weight_delta_norms_L=deltas.copy() if num_layers else state.last_weight_delta_norms_L,
    )
    return obs, raw, new_state
