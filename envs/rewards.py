"""The gradient-alignment reward: pure functions of the per-domain Gram matrix in ``TrainSignals``.

Dimension legend: K = domains.

Alignment scores follow the reference exactly (docs/reference.md, R1): with ``G`` the K x K Gram matrix of the
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

Reward modes (``EnvConfig.reward_mode``). Users mark ``target`` domains and want their validation
loss lower, sooner; the reward must be maximised by the mixture that does that, which is interior
when domains are complementary. Write ``g_i`` for domain i's mean gradient this step, ``m`` for the
step's realised mixture (each domain's share of the step's micro-batches: the update really is
``g_m = sum_i m_i g_i``) and ``g_T`` for the mean gradient over the target domains present. All three
modes below are functions of the Gram matrix alone.

- ``direction`` (default): ``r = cos(g_m, g_T) = m^T G t / (sqrt(m^T G m) sqrt(t^T G t))`` with
  ``t`` uniform over the present targets (``|g_m|`` from the raw Gram matrix: it is the update applied,
  noise included; the rest from the debiased one; clipped to [-1, 1]). With Adam and clipping the update's length is roughly fixed,
  so the first-order decrease of the target loss follows the update's direction. Parts:
  ``parts_i = m_i (G t)_i / (|g_m| |g_T|)`` (they sum to r). Its maximiser over the simplex is the
  mixture whose update points most nearly along the target gradient: junk (opposed) goes to the floor,
  and complementary targets share the weight, because a mixture concentrated on one of them points
  away from the others.
- ``quadratic``: the second-order model of the target loss decrease, normalised by ``|g_T|^2``:
  ``r = m^T a - (lam / 2) m^T A m`` with ``a = G t / |g_T|^2`` (alignment with the targets only) and
  ``A = G / |g_T|^2``; ``lam`` is ``EnvConfig.reward_curvature``. Parts ``m_i a_i - (lam/2) m_i (A m)_i``.
- ``mixture``: ``r = <w, s>`` (the project's first reward, linear in the mixture, so maximised at a
  vertex: kept for the ablation). Parts ``w_i s_i``.
- ``reference``: the paper's per-domain scores, ``parts_i = s_i`` and ``r = mean_i s_i``.

**Self terms.** ``G_ii = |g_i|^2`` of a mean over ``n_i`` micro-batches carries their sampling noise,
``E|g_i|^2 = |mu_i|^2 + v_i / n_i``, which would credit a target with alignment to itself that is only
noise. With the per-domain sums of each micro-batch's squared norm ``S_i`` (``TrainSignals.
microbatch_sqnorm_K``), ``debiased_gram`` replaces the diagonal by the unbiased
``(n_i^2 G_ii - S_i) / (n_i (n_i - 1))`` (the mean of the cross products of distinct micro-batches:
disjoint micro-batches estimate a domain's gradient and its alignment with itself) where
``n_i >= 2``. Where ``n_i = 1`` the raw diagonal stays; its excess ``v_i / n_i`` times ``m_i = n_i / N``
is ``v_i / N`` in the numerator, a constant that does not depend on the mixture. Off-diagonal entries
pair independent micro-batches and are unbiased already.

**Smoothing** (``EnvConfig.reward_smoothing``, beta). On a small LM the per-micro-batch gradient noise
dwarfs the mean gradients: one step's debiased Gram matrix is unbiased but so noisy that its
quadratic forms are often negative. ``GramAverage`` keeps an exponential moving average of the
debiased Gram matrices (an entry moves only on steps where both domains were present; its first
observation sets it) and projects it onto the positive semi-definite cone; ``direction`` and
``quadratic`` then score the step's realised mixture under that smoothed geometry. The reward stays a
function of the action (the mixture applied) and of a slowly moving state (the gradient geometry), with
a fraction of the per-step noise. With beta = 0 the step's own debiased Gram matrix is used (and the
update's norm comes from the raw one: it is the update applied, noise included).

With no target or fewer than two domains present, or a Gram matrix that is missing, non-finite or
gives a non-positive norm, the reward is 0 and marked invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from envs.signals import TrainSignals

NORM_EPS = 1e-6
STD_EPS = 1e-8

RewardMode = Literal["direction", "quadratic", "mixture", "reference"]
REWARD_MODES: tuple[str, ...] = ("direction", "quadratic", "mixture", "reference")


@dataclass(frozen=True)
class RewardResult:
    """The reward of one optimiser step.

    Attributes:
        reward: the env's scalar reward.
        parts_K: per-domain reward parts (the critic's K heads); ``reward`` is their sum
            (direction, quadratic, mixture) or mean (reference).
        scores_K: alignment scores ``s`` (z-scored, clamped; 0 for absent domains).
        raw_scores_K: off-diagonal Gram row sums over the mean gradient norm, before z-scoring.
        valid: False when no usable Gram matrix existed (no probe, skipped step, < 2 domains present).
        gram_KK: the Gram matrix the reward used (diagonal debiased where possible); None when none.
    """

    reward: float
    parts_K: np.ndarray
    scores_K: np.ndarray
    raw_scores_K: np.ndarray
    valid: bool
    gram_KK: np.ndarray | None = None


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


def debiased_gram(
    gram_KK: np.ndarray, microbatch_sqnorm_K: np.ndarray | None, microbatches_K: np.ndarray
) -> np.ndarray:
    """The Gram matrix with each diagonal entry of a domain with ``n_i >= 2`` micro-batches replaced
    by the unbiased ``(n_i^2 G_ii - S_i) / (n_i (n_i - 1))`` (module docstring); unchanged without
    ``microbatch_sqnorm_K``. A copy, float64."""
    gram = np.array(gram_KK, dtype=np.float64)
    if microbatch_sqnorm_K is None:
        return gram
    n_K = np.asarray(microbatches_K, dtype=np.float64)
    s_K = np.asarray(microbatch_sqnorm_K, dtype=np.float64)
    if s_K.shape != n_K.shape or gram.shape != (n_K.size, n_K.size):
        raise ValueError(
            f"microbatch_sqnorm_K {s_K.shape}, microbatches_K {n_K.shape} and gram_KK {gram.shape} disagree"
        )
    many = n_K >= 2
    idx = np.flatnonzero(many)
    n = n_K[idx]
    gram[idx, idx] = (n * n * gram[idx, idx] - s_K[idx]) / (n * (n - 1.0))
    return gram


def psd_projection(gram_KK: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (negative eigenvalues set to 0), symmetrised."""
    sym = 0.5 * (np.asarray(gram_KK, dtype=np.float64) + np.asarray(gram_KK, dtype=np.float64).T)
    vals, vecs = np.linalg.eigh(sym)
    return (vecs * np.clip(vals, 0.0, None)) @ vecs.T


class GramAverage:
    """Exponential moving average of per-step (debiased) Gram matrices; part of the env's state.

    ``update`` folds in one step's matrix: entries of pairs present together move by
    ``G <- beta G + (1 - beta) G_step``, a pair's first observation sets its entry, and pairs not yet
    seen stay 0. ``value`` is the average projected onto the positive semi-definite cone.
    """

    def __init__(self, num_domains: int, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"reward_smoothing must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.mean_KK = np.zeros((num_domains, num_domains))
        self.seen_KK = np.zeros((num_domains, num_domains), dtype=bool)

    def update(self, gram_KK: np.ndarray, present_K: np.ndarray) -> np.ndarray:
        """Fold in ``gram_KK`` over the present domains; returns ``value()``."""
        present = np.asarray(present_K, dtype=bool)
        both = present[:, None] & present[None, :]
        fresh, old = both & ~self.seen_KK, both & self.seen_KK
        self.mean_KK[fresh] = gram_KK[fresh]
        self.mean_KK[old] = self.beta * self.mean_KK[old] + (1.0 - self.beta) * gram_KK[old]
        self.seen_KK |= both
        return self.value()

    def value(self) -> np.ndarray:
        """The positive semi-definite projection of the average (0 where never seen)."""
        return psd_projection(np.where(self.seen_KK, self.mean_KK, 0.0))

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, for checkpoints."""
        return {"mean_KK": self.mean_KK.tolist(), "seen_KK": self.seen_KK.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; a state of another K is rejected."""
        mean = np.asarray(state["mean_KK"], dtype=np.float64)
        if mean.shape != self.mean_KK.shape:
            raise ValueError(f"reward state has a {mean.shape} Gram average, this env {self.mean_KK.shape}")
        self.mean_KK = mean
        self.seen_KK = np.asarray(state["seen_KK"], dtype=bool)


def target_vector(target_mask_K: np.ndarray, present_K: np.ndarray) -> np.ndarray:
    """``t``: uniform over the target domains present (``g_T = sum_i t_i g_i``); zeros if none is."""
    keep = np.asarray(target_mask_K, dtype=bool) & np.asarray(present_K, dtype=bool)
    t = keep.astype(np.float64)
    return t / t.sum() if t.sum() > 0 else t


def direction_parts(
    gram_KK: np.ndarray, mix_K: np.ndarray, t_K: np.ndarray, update_gram_KK: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """``parts_i = m_i (G t)_i / (|g_m| |g_T|)``, summing to ``cos(g_m, g_T)``; ``(zeros, False)`` when
    either norm is not positive.

    ``|g_m|`` is the norm of the update actually applied, so it comes from ``update_gram_KK`` (the raw
    Gram matrix, noise included) when given; the alignment and ``|g_T|`` come from ``gram_KK`` (the
    debiased one). An unbiased estimate is not a Cauchy-Schwarz pair, so the cosine is clipped to
    [-1, 1] (the parts scaled alike)."""
    gram = np.asarray(gram_KK, dtype=np.float64)
    update = gram if update_gram_KK is None else np.asarray(update_gram_KK, dtype=np.float64)
    mix, t = np.asarray(mix_K, dtype=np.float64), np.asarray(t_K, dtype=np.float64)
    norm2_mix, norm2_t = float(mix @ update @ mix), float(t @ gram @ t)
    if not (norm2_mix > 0 and norm2_t > 0):
        return np.zeros_like(mix), False
    parts = mix * (gram @ t) / math.sqrt(norm2_mix * norm2_t)
    total = float(parts.sum())
    if abs(total) > 1.0:
        parts = parts / abs(total)
    return parts, True


def quadratic_parts(
    gram_KK: np.ndarray, mix_K: np.ndarray, t_K: np.ndarray, curvature: float
) -> tuple[np.ndarray, bool]:
    """``parts_i = m_i a_i - (lam/2) m_i (A m)_i`` with ``a = G t / |g_T|^2``, ``A = G / |g_T|^2``;
    ``(zeros, False)`` when ``|g_T|^2`` is not positive."""
    gram = np.asarray(gram_KK, dtype=np.float64)
    mix, t = np.asarray(mix_K, dtype=np.float64), np.asarray(t_K, dtype=np.float64)
    norm2_t = float(t @ gram @ t)
    if not norm2_t > 0:
        return np.zeros_like(mix), False
    return mix * (gram @ t - 0.5 * curvature * (gram @ mix)) / norm2_t, True


def reward_from_scores(
    scores_K: np.ndarray, weights_K: np.ndarray, mode: RewardMode = "mixture"
) -> tuple[float, np.ndarray]:
    """Turn scores into ``(reward, parts_K)`` for the score-based modes ``mixture`` and ``reference``."""
    scores = np.asarray(scores_K, dtype=np.float64)
    if mode == "mixture":
        weights = np.asarray(weights_K, dtype=np.float64)
        if weights.shape != scores.shape:
            raise ValueError(f"weights_K shape {weights.shape} does not match scores_K shape {scores.shape}")
        parts = weights * scores
        return float(parts.sum()), parts
    if mode == "reference":
        return float(scores.mean()) if scores.size else 0.0, scores.copy()
    raise ValueError(f"reward mode must be 'mixture' or 'reference' here, got {mode!r}")


def compute_reward(
    signals: TrainSignals,
    *,
    mode: RewardMode = "direction",
    clamp: float = 3.0,
    target_mask_K: np.ndarray | None = None,
    curvature: float = 1.0,
    debias: bool = True,
    average: GramAverage | None = None,
) -> RewardResult:
    """The reward of one optimiser step from its ``TrainSignals`` (module docstring).

    Args:
        signals: the step's record.
        mode: one of ``REWARD_MODES``.
        clamp: z-score clamp of the alignment scores.
        target_mask_K: the target domains (``direction`` and ``quadratic``); all when None.
        curvature: ``lam`` of the ``quadratic`` mode.
        debias: replace the Gram diagonal by its unbiased estimate where possible (``debiased_gram``).
        average: the env's ``GramAverage`` (``direction`` and ``quadratic``): this step's Gram matrix is
            folded in and the step is scored under the smoothed geometry; None scores it under its own.

    A skipped step (non-finite loss or gradient) or a step without a usable Gram matrix gets zero
    scores and reward 0 with ``valid=False``, so an overflow never reaches the agent as a reward.
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"env.reward_mode must be one of {list(REWARD_MODES)}, got {mode!r}")
    k = signals.num_domains
    counts_K = np.asarray(signals.microbatches_K)
    present = counts_K > 0
    gram = None if signals.skipped else signals.gram_KK
    if gram is not None and np.shape(gram) != (k, k):
        raise ValueError(f"signals.gram_KK must have shape ({k}, {k}), got {np.shape(gram)}")
    scores, raw, valid = alignment_scores(gram, present, clamp=clamp)
    if scores.shape != (k,):
        scores, raw = np.zeros(k), np.zeros(k)
    if mode in ("mixture", "reference"):
        reward, parts = reward_from_scores(scores, signals.weights_K, mode)
        used = None if gram is None else np.asarray(gram, dtype=np.float64)
        return RewardResult(reward, parts, scores, raw, valid, used if valid else None)
    if not valid:
        return RewardResult(0.0, np.zeros(k), scores, raw, False, None)
    used = debiased_gram(gram, signals.microbatch_sqnorm_K if debias else None, counts_K)
    targets = np.ones(k, dtype=bool) if target_mask_K is None else np.asarray(target_mask_K, dtype=bool)
    if targets.shape != (k,):
        raise ValueError(f"target_mask_K must have shape ({k},), got {targets.shape}")
    t_K = target_vector(targets, present)
    mix_K = counts_K / counts_K.sum()
    if t_K.sum() == 0:
        return RewardResult(0.0, np.zeros(k), scores, raw, False, used)
    geometry, update = used, np.asarray(gram, dtype=np.float64)
    if average is not None:
        geometry = update = average.update(used, present)
    if mode == "direction":
        parts, ok = direction_parts(geometry, mix_K, t_K, update_gram_KK=update)
    else:
        parts, ok = quadratic_parts(geometry, mix_K, t_K, curvature)
    return RewardResult(float(parts.sum()) if ok else 0.0, parts, scores, raw, ok, used)
