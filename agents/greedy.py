"""Closed-form mixers on the gradient-alignment signal: the one-step greedy mixer and mirror descent.

Dimension legend: K = domains.

Both read the Gram matrix of per-domain mean gradients that the env's reward used
(``Transition.reward_gram_KK``, its diagonal debiased; ``gram_KK`` when absent), the micro-batch
counts (``microbatches_K``, to know which domains were present) and the target domains
(``target_mask_K``; every domain when absent). Like the ODM bandits they learn in ``observe``
and ``update()`` only reports diagnostics.

**Greedy** (``kind: greedy``) is the bar the actor-critic must clear: what does learning over time add
to the closed-form step on its own reward? It keeps an exponential moving average ``Gbar`` of the Gram
matrix (an entry moves only on steps where both domains were present; its first observation sets it)
and acts with the mixture that maximises the ``direction`` reward one step ahead,

    max_w  w^T Gbar t / sqrt(w^T Gbar w)   over {w : w_i >= floor, sum w = 1},

with ``t`` uniform over the targets (``objective: quadratic`` maximises ``w^T a - (lam/2) w^T A w``
instead, ``a = Gbar t / |g_T|^2``, ``A = Gbar / |g_T|^2``). ``Gbar`` is first projected onto the
positive semi-definite cone (a debiased diagonal can make a smoothed estimate slightly indefinite).
The ratio is not concave, so the solver (projected gradient ascent with a backtracking step) starts
from the previous solution, and from uniform whenever uniform is already better. Its published relatives are DoGE
(arXiv 2310.15393) and DGA (arXiv 2410.02498). Before any Gram matrix has been seen it plays uniform.

**Mirror descent** (``kind: mirror_descent``) accumulates each domain's alignment with the targets,
``a_i = cos(g_i, mean of the other present targets' gradients)`` from the step's raw Gram matrix
(``Transition.gram_KK``), as ``log w += eta a`` (exponentiated gradient). It is the baseline that shows
what accumulating a persistent linear signal does: it ends at a vertex.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agents.base import BaseMixer, Transition, project_to_simplex, register_mixer

log = logging.getLogger(__name__)

_SOLVER_ITERS = 200
_RIDGE = 1e-9


def alignment_gram(
    transition: Transition, num_domains: int, *, debiased: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(gram_KK, present_K, target_K)`` of a step: the debiased ``reward_gram_KK`` (or the raw
    ``gram_KK`` when ``debiased`` is False or it is absent); None when the step has no usable Gram
    matrix (no probe, a skipped step). A step whose reward was invalid only because a noisy debiased
    estimate gave a non-positive norm still counts: leaving it out would bias the average upwards."""
    gram = transition.reward_gram_KK if debiased else None
    gram = transition.gram_KK if gram is None else gram
    if gram is None or transition.skipped:
        return None
    gram_KK = np.asarray(gram, dtype=np.float64)
    if gram_KK.shape != (num_domains, num_domains):
        raise ValueError(f"the step's Gram matrix must have shape ({num_domains}, {num_domains}), got {gram_KK.shape}")
    if not np.all(np.isfinite(gram_KK)):
        return None
    counts, target = transition.microbatches_K, transition.target_mask_K
    present_K = np.diag(gram_KK) != 0 if counts is None else np.asarray(counts) > 0
    target_K = np.ones(num_domains, dtype=bool) if target is None else np.asarray(target, dtype=bool)
    if present_K.shape != (num_domains,) or target_K.shape != (num_domains,):
        raise ValueError(f"transition.microbatches_K and target_mask_K must have shape ({num_domains},)")
    return gram_KK, present_K, target_K


def psd_projection(gram_KK: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (negative eigenvalues set to 0), symmetrised."""
    sym = 0.5 * (gram_KK + gram_KK.T)
    vals, vecs = np.linalg.eigh(sym)
    return (vecs * np.clip(vals, 0.0, None)) @ vecs.T


def direction_objective(w_K: np.ndarray, gram_KK: np.ndarray, t_K: np.ndarray) -> tuple[float, np.ndarray]:
    """``f(w) = w^T G t / sqrt(w^T G w)`` and its gradient (``|g_T|`` is a constant, left out)."""
    gt_K, gw_K = gram_KK @ t_K, gram_KK @ w_K
    norm = math.sqrt(max(float(w_K @ gw_K), _RIDGE))
    value = float(w_K @ gt_K) / norm
    return value, gt_K / norm - value * gw_K / norm**2


def quadratic_objective(
    w_K: np.ndarray, gram_KK: np.ndarray, t_K: np.ndarray, curvature: float
) -> tuple[float, np.ndarray]:
    """``f(w) = w^T a - (lam/2) w^T A w`` (``a = G t / |g_T|^2``, ``A = G / |g_T|^2``) and its gradient."""
    scale = max(float(t_K @ gram_KK @ t_K), _RIDGE)
    a_K, aw_K = gram_KK @ t_K / scale, gram_KK @ w_K / scale
    return float(w_K @ a_K - 0.5 * curvature * w_K @ aw_K), a_K - curvature * aw_K


def maximise_on_simplex(objective: Any, starts: list[np.ndarray], floor: float, tol: float = 1e-6) -> np.ndarray:
    """Projected gradient ascent with a backtracking step on the floored simplex.

    Ascends from ``starts[0]`` until a step moves no weight by more than ``tol``; each further start is
    ascended from only if it is already better than the best point so far (a cheap guard against a
    warm start stuck on a worse local maximum of a non-concave objective). Returns the best end point.
    """
    best_w, best_v = project_to_simplex(starts[0], floor), -math.inf
    for start in starts:
        w = project_to_simplex(start, floor)
        value, grad = objective(w)
        if value <= best_v:
            continue
        step = 1.0
        for _ in range(_SOLVER_ITERS):
            while step > 1e-8:
                cand = project_to_simplex(w + step * grad, floor)
                cand_value, cand_grad = objective(cand)
                if cand_value >= value:
                    break
                step *= 0.5
            else:
                break
            moved = float(np.abs(cand - w).max())
            w, value, grad = cand, cand_value, cand_grad
            step *= 2.0
            if moved < tol:
                break
        if value > best_v:
            best_w, best_v = w, value
    return best_w


def mirror_alignment(gram_KK: np.ndarray, present_K: np.ndarray, target_K: np.ndarray) -> np.ndarray | None:
    """Each present domain's cosine with the mean gradient of the *other* present targets (leave-one-
    out: a domain's own micro-batches never count as agreeing with themselves), 0 for absent ones;
    None when no domain has another present target to compare with. ``gram_KK`` is the step's raw
    Gram matrix (positive semi-definite, so the cosines are in [-1, 1])."""
    k = gram_KK.shape[0]
    a_K = np.zeros(k)
    any_pair = False
    for i in np.flatnonzero(present_K):
        others = target_K & present_K
        others[i] = False
        if not others.any():
            continue
        t_K = others / others.sum()
        denom = math.sqrt(max(float(gram_KK[i, i]), 0.0) * max(float(t_K @ gram_KK @ t_K), 0.0))
        if denom > 0:
            a_K[i] = float(gram_KK[i] @ t_K) / denom
            any_pair = True
    return a_K if any_pair else None


@register_mixer("greedy")
class GreedyMixer(BaseMixer):
    """The one-step greedy mixer on the smoothed Gram matrix (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.num_domains
        self.gram_KK = np.zeros((k, k))
        self.seen_KK = np.zeros((k, k), dtype=bool)
        self.target_K = np.ones(k, dtype=bool)
        self.weights_K = np.full(k, 1.0 / k)
        self.stale = False  # observed since the last solve: the mixture is solved when next read
        self.num_updates = 0
        self.objective_value = math.nan

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The current greedy mixture (deterministic; ``explore`` is ignored)."""
        self._check_obs(obs)
        return self._finish(self._solved())

    def _solved(self) -> np.ndarray:
        """The mixture, solved for the Gram matrix observed so far. Solving waits until the mixture is
        read, so a mixer whose mixture nobody reads (AC-ODM's teacher after its warm-up, on the acting
        copy) does no solver work; the solves that do run see the same starting points as eager ones."""
        if self.stale:
            self.weights_K, self.stale = self.solve(), False
        return self.weights_K

    def observe(self, transition: Transition) -> None:
        """Fold the step's Gram matrix into the moving average and solve for the next mixture."""
        got = alignment_gram(transition, self.num_domains)
        if got is None:
            return
        gram_KK, present_K, self.target_K = got
        beta = self.config.greedy_smoothing
        both = present_K[:, None] & present_K[None, :]
        fresh = both & ~self.seen_KK
        old = both & self.seen_KK
        self.gram_KK[fresh] = gram_KK[fresh]
        self.gram_KK[old] = beta * self.gram_KK[old] + (1.0 - beta) * gram_KK[old]
        self.seen_KK |= both
        self.num_updates += 1
        self.stale = True

    def solve(self) -> np.ndarray:
        """The mixture that maximises the configured objective on the smoothed Gram matrix; the current
        mixture when no target has been seen yet."""
        known = np.diag(self.seen_KK)
        targets = self.target_K & known
        if not targets.any():
            return self.weights_K
        gram = psd_projection(np.where(self.seen_KK, self.gram_KK, 0.0))
        t_K = targets / targets.sum()
        cfg = self.config
        if cfg.greedy_objective == "direction":
            def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
                return direction_objective(w, gram, t_K)
        else:
            def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
                return quadratic_objective(w, gram, t_K, cfg.greedy_curvature)
        w = maximise_on_simplex(objective, [self.weights_K, np.full(self.num_domains, 1.0 / self.num_domains)], self.floor)
        self.objective_value = objective(w)[0]
        return w

    def update(self) -> dict[str, float]:
        """Diagnostics only (the mixer learned in ``observe``)."""
        self._solved()
        return {
            "agent/num_updates": float(self.num_updates),
            "agent/objective": float(self.objective_value),
            "agent/max_weight": float(self.weights_K.max()),
        }

    def state_dict(self) -> dict[str, Any]:
        """The smoothed Gram matrix, what has been seen, the targets and the current mixture."""
        self._solved()
        return {
            **self._header(),
            "gram_KK": torch.tensor(self.gram_KK, dtype=torch.float64),
            "seen_KK": torch.tensor(self.seen_KK),
            "target_K": torch.tensor(self.target_K),
            "weights_K": torch.tensor(self.weights_K, dtype=torch.float64),
            "num_updates": self.num_updates,
            "objective_value": self.objective_value,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a state of another K or domain list is rejected."""
        self._check_header(state)
        self.gram_KK = np.asarray(state["gram_KK"], dtype=np.float64).copy()
        self.seen_KK = np.asarray(state["seen_KK"], dtype=bool).copy()
        self.target_K = np.asarray(state["target_K"], dtype=bool).copy()
        self.weights_K = np.asarray(state["weights_K"], dtype=np.float64).copy()
        self.num_updates = int(state["num_updates"])
        self.objective_value = float(state["objective_value"])


@register_mixer("mirror_descent")
class MirrorDescentMixer(BaseMixer):
    """Exponentiated gradient on each domain's mean cosine to the targets (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_weights_K = np.zeros(self.num_domains)
        self.num_updates = 0

    @property
    def weights_K(self) -> np.ndarray:
        """``softmax(log_weights)``."""
        z = self.log_weights_K - self.log_weights_K.max()
        return np.exp(z) / np.exp(z).sum()

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """The current mixture on the floored simplex."""
        self._check_obs(obs)
        return self._finish(self.weights_K)

    def observe(self, transition: Transition) -> None:
        """``log w_i += eta a_i`` for the present domains (``mirror_alignment`` of the raw Gram matrix)."""
        got = alignment_gram(transition, self.num_domains, debiased=False)
        if got is None:
            return
        a_K = mirror_alignment(*got)
        if a_K is None:
            return
        self.log_weights_K = self.log_weights_K + self.config.mirror_descent_lr * a_K
        self.num_updates += 1

    def update(self) -> dict[str, float]:
        """Diagnostics only."""
        return {"agent/num_updates": float(self.num_updates), "agent/max_weight": float(self.weights_K.max())}

    def state_dict(self) -> dict[str, Any]:
        """The accumulated log-weights and the update count."""
        return {
            **self._header(),
            "log_weights_K": torch.tensor(self.log_weights_K, dtype=torch.float64),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a state of another K or domain list is rejected."""
        self._check_header(state)
        self.log_weights_K = np.asarray(state["log_weights_K"], dtype=np.float64).copy()
        self.num_updates = int(state["num_updates"])
