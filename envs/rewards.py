"""The gradient-alignment reward: pure functions of the per-domain Gram matrix in ``TrainSignals``.

Dimension legend: K = domains.

Alignment scores follow the reference exactly (spec §1.3): with ``G`` the K x K Gram matrix of the
per-domain *mean* gradients of the probed parameters,

1. ``raw_i = sum_{j != i} G_ij`` (off-diagonal row sums: how much domain i's gradient agrees with the
   others, the cross-term of d||sum_j a_j g_j||^2 / d a_i at uniform a);
2. divided by the mean gradient norm ``mean_k sqrt(G_kk) + 1e-6`` (so raw scores have the units of one
   gradient norm, and the LM loss scale and 1/grad_accum factors only rescale them);
3. z-scored over domains with the *unbiased* std (``ddof=1``) plus ``1e-8``, and clamped to
   ``[-clamp, clamp]``.

The reference's extra clip of the raw scores to [-999, 999] never binds in practice and is omitted.

Absent domains (no micro-batch this step, so their Gram row and column are zero) are handled by one
rule: they are left out of the mean gradient norm and of the z-score statistics, and their score is 0
(the z-score mean, i.e. neutral). With fewer than two present domains, or a Gram matrix that is
missing or non-finite (a skipped, overflowed step: reference bug B14), every score is 0 and the
result is marked invalid. Nothing divides by zero: the mean norm carries ``+1e-6`` and the std
``+1e-8``, so identical or orthogonal gradients give all-zero scores.

Reward modes (``EnvConfig.reward_mode``): z-scored scores sum to zero over present domains, so the
reference's actor objective (the mean of per-domain scores) is degenerate up to clamping.
``mixture`` (default) rewards the mixture for the weight it put on aligned domains:
``parts_i = w_i * s_i`` and ``r = sum_i parts_i = <w, s>``, a linear surrogate of constructive
gradient interference. ``reference`` keeps the literal per-domain scores: ``parts_i = s_i`` and the
scalar ``r = mean_i s_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from envs.signals import TrainSignals

NORM_EPS = 1e-6
STD_EPS = 1e-8

RewardMode = Literal["mixture", "reference"]


@dataclass(frozen=True)
class RewardResult:
    """The reward of one optimiser step.

    Attributes:
        reward: the env's scalar reward.
        parts_K: per-domain reward parts (the critic's K heads); ``reward`` is their sum (mixture)
            or mean (reference).
        scores_K: alignment scores ``s`` (z-scored, clamped; 0 for absent domains).
        raw_scores_K: off-diagonal Gram row sums over the mean gradient norm, before z-scoring.
        valid: False when no usable Gram matrix existed (no probe, skipped step, < 2 domains present).
    """

    reward: float
    parts_K: np.ndarray
    scores_K: np.ndarray
    raw_scores_K: np.ndarray
    valid: bool


def zscore(values: np.ndarray, clamp: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score ``values`` over the entries in ``mask`` (unbiased std + 1e-8), clamp, zero elsewhere.

    Args:
        values: 1-D array; entries outside ``mask`` are ignored and may be NaN.
        clamp: results are clipped to ``[-clamp, clamp]``.
        mask: which entries take part; all when None.

    Returns:
        float64 array of the same length; all zeros when fewer than two entries take part.
    """
    values = np.asarray(values, dtype=np.float64)
    keep = np.ones(values.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.zeros_like(values)
    if int(keep.sum()) < 2:
        return out
    sel = values[keep]
    out[keep] = (sel - sel.mean()) / (sel.std(ddof=1) + STD_EPS)
    return np.clip(out, -clamp, clamp)


def raw_alignment_scores(gram_KK: np.ndarray, present_K: np.ndarray | None = None) -> np.ndarray:
    """Off-diagonal Gram row sums divided by (mean gradient norm of present domains + 1e-6).

    Args:
        gram_KK: Gram matrix of the per-domain mean gradients (symmetric, finite).
        present_K: domains that had at least one micro-batch; all when None. Absent domains get 0.

    Returns:
        float64 K-vector of raw scores.
    """
    gram = np.asarray(gram_KK, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram_KK must be a square matrix, got shape {gram.shape}")
    k = gram.shape[0]
    present = np.ones(k, dtype=bool) if present_K is None else np.asarray(present_K, dtype=bool)
    if present.shape != (k,):
        raise ValueError(f"present_K must have shape ({k},), got {present.shape}")
    # Absent domains' rows/columns are zero by construction; mask them anyway so a caller's stale
    # values can never leak into the scores.
    g = np.where(present[:, None] & present[None, :], gram, 0.0)
    row_sums = g.sum(axis=1) - np.diag(g)
    if not present.any():
        return np.zeros(k)
    mean_norm = np.sqrt(np.clip(np.diag(g)[present], 0.0, None)).mean()
    return np.where(present, row_sums / (mean_norm + NORM_EPS), 0.0)


def alignment_scores(
    gram_KK: np.ndarray | None, present_K: np.ndarray | None = None, *, clamp: float = 3.0
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Alignment scores ``s`` exactly as the reference (module docstring), with the absent-domain rule.

    Args:
        gram_KK: Gram matrix of per-domain mean gradients, or None when no probe ran.
        present_K: boolean mask of domains present this step; all when None.
        clamp: z-score clamp.

    Returns:
        ``(scores_K, raw_scores_K, valid)``; scores are zeros and ``valid`` False when the Gram matrix
        is missing or non-finite or fewer than two domains are present.
    """
    if gram_KK is None:
        k = 0 if present_K is None else len(present_K)
        return np.zeros(k), np.zeros(k), False
    gram = np.asarray(gram_KK, dtype=np.float64)
    k = gram.shape[0]
    present = np.ones(k, dtype=bool) if present_K is None else np.asarray(present_K, dtype=bool)
    if not np.all(np.isfinite(gram)) or int(present.sum()) < 2:
        return np.zeros(k), np.zeros(k), False
    raw = raw_alignment_scores(gram, present)
    return zscore(raw, clamp, mask=present), raw, True


def reward_from_scores(
    scores_K: np.ndarray, weights_K: np.ndarray, mode: RewardMode = "mixture"
) -> tuple[float, np.ndarray]:
    """Turn scores into ``(reward, parts_K)`` for ``mode`` (module docstring)."""
    scores = np.asarray(scores_K, dtype=np.float64)
    if mode == "mixture":
        weights = np.asarray(weights_K, dtype=np.float64)
        if weights.shape != scores.shape:
            raise ValueError(f"weights_K shape {weights.shape} does not match scores_K shape {scores.shape}")
        parts = weights * scores
        return float(parts.sum()), parts
    if mode == "reference":
        return float(scores.mean()) if scores.size else 0.0, scores.copy()
    raise ValueError(f"reward mode must be 'mixture' or 'reference', got {mode!r}")


def compute_reward(
    signals: TrainSignals, *, mode: RewardMode = "mixture", clamp: float = 3.0
) -> RewardResult:
    """The reward of one optimiser step from its ``TrainSignals``.

    A skipped step (non-finite loss or gradient) or a step without a usable Gram matrix gets zero
    scores and reward 0 with ``valid=False``, so an overflow never reaches the agent as a reward.
    """
    k = signals.num_domains
    present = np.asarray(signals.microbatches_K) > 0
    gram = None if signals.skipped else signals.gram_KK
    if gram is not None and np.shape(gram) != (k, k):
        raise ValueError(f"signals.gram_KK must have shape ({k}, {k}), got {np.shape(gram)}")
    scores, raw, valid = alignment_scores(gram, present, clamp=clamp)
    if scores.shape != (k,):
        scores, raw = np.zeros(k), np.zeros(k)
    reward, parts = reward_from_scores(scores, signals.weights_K, mode)
    return RewardResult(reward=reward, parts_K=parts, scores_K=scores, raw_scores_K=raw, valid=valid)
