"""Alignment scores and rewards against hand-computed oracles (docs/reference.md, R1)."""

from __future__ import annotations

import numpy as np
import pytest

from envs.rewards import (
    NORM_EPS,
    STD_EPS,
    alignment_scores,
    compute_reward,
    debiased_gram,
    raw_alignment_scores,
    reward_from_scores,
    zscore,
)
from envs.signals import TrainSignals


def gram(rows):
    g = np.asarray(rows, dtype=np.float64)
    return g @ g.T


def naive_scores(rows, clamp=3.0):
    """A literal loop transcription of the reference's compute_rewards + mean_std_norm."""
    g = np.asarray(rows, dtype=np.float64)
    k = len(g)
    raw = []
    mean_norm = sum(np.sqrt(sum(x * x for x in g[i])) for i in range(k)) / k
    for i in range(k):
        total = 0.0
        for j in range(k):
            if j != i:
                total += sum(g[i][t] * g[j][t] for t in range(g.shape[1]))
        raw.append(total / (mean_norm + 1e-6))
    raw = np.array(raw)
    mean = raw.mean()
    std = np.sqrt(((raw - mean) ** 2).sum() / (k - 1))
    return np.clip((raw - mean) / (std + 1e-8), -clamp, clamp), raw


def test_scores_match_a_literal_transcription_of_the_reference():
    rows = np.random.default_rng(0).normal(size=(5, 7))
    rows[1] += 2 * rows[0]
    scores, raw, valid = alignment_scores(gram(rows))
    expected_scores, expected_raw = naive_scores(rows)
    assert valid
    np.testing.assert_allclose(raw, expected_raw, rtol=1e-12)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-10, atol=1e-12)


def test_hand_computed_example():
    # g0 = (1, 0), g1 = (1, 1), g2 = (0, 2): <g0,g1> = 1, <g0,g2> = 0, <g1,g2> = 2.
    rows = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    mean_norm = (1 + np.sqrt(2) + 2) / 3
    raw = raw_alignment_scores(gram(rows))
    np.testing.assert_allclose(raw, np.array([1.0, 3.0, 2.0]) / (mean_norm + NORM_EPS))
    scores, _, _ = alignment_scores(gram(rows))
    # raw is proportional to (1, 3, 2): mean 2, unbiased std 1, so z = (-1, 1, 0) up to the 1e-8.
    np.testing.assert_allclose(scores, [-1.0, 1.0, 0.0], atol=1e-7)


def test_orthogonal_gradients_give_zero_raw_scores():
    rows = np.eye(4) * np.array([[1.0], [2.0], [0.5], [3.0]])
    scores, raw, valid = alignment_scores(gram(rows))
    assert valid
    assert np.array_equal(raw, np.zeros(4))
    assert np.array_equal(scores, np.zeros(4))


def test_identical_gradients_give_equal_scores():
    rows = np.tile(np.array([[0.3, -1.2, 2.0]]), (4, 1))
    scores, raw, _ = alignment_scores(gram(rows))
    np.testing.assert_allclose(raw, raw[0])
    np.testing.assert_allclose(scores, scores[0], atol=1e-6)
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)


def test_anti_aligned_domain_gets_the_lowest_score():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=16)
    rows = [shared + 0.3 * rng.normal(size=16) for _ in range(4)]
    rows.append(-shared + 0.3 * rng.normal(size=16))
    scores, raw, _ = alignment_scores(gram(rows))
    assert np.argmin(scores) == 4 and np.argmin(raw) == 4
    assert scores[4] < 0 < scores[:4].min()


@pytest.mark.parametrize("scale", [1e-3, 0.37, 1e4])
def test_scores_are_invariant_to_a_global_gradient_scale(scale):
    rows = np.random.default_rng(2).normal(size=(6, 9))
    base, _, _ = alignment_scores(gram(rows))
    scaled, _, _ = alignment_scores(gram(scale * rows))
    np.testing.assert_allclose(scaled, base, rtol=1e-5, atol=1e-6)


def test_scores_are_clamped():
    rows = np.zeros((30, 2))
    rows[:, 0] = 1.0
    rows[0] = [-50.0, 0.0]  # one extreme outlier among 30 domains: |z| would be about 5.3
    scores, _, _ = alignment_scores(gram(rows), clamp=3.0)
    assert scores.min() == -3.0 and scores.max() <= 3.0


def test_absent_domain_is_neutral_and_excluded_from_statistics():
    rows = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    present = np.array([True, True, False, True])
    scores, raw, valid = alignment_scores(gram(rows), present)
    assert valid and np.all(np.isfinite(scores))
    assert scores[2] == 0.0 and raw[2] == 0.0
    expected, _, _ = alignment_scores(gram(rows[[0, 1, 3]]))  # as if the domain did not exist
    np.testing.assert_allclose(scores[[0, 1, 3]], expected)


def test_degenerate_inputs_give_zero_scores_without_division_by_zero():
    with np.errstate(all="raise"):  # any division by zero or invalid op would raise here
        scores, _, valid = alignment_scores(np.zeros((3, 3)))
        assert valid and np.array_equal(scores, np.zeros(3))
        scores, _, valid = alignment_scores(
            gram([[1.0, 2.0], [0, 0], [0, 0]]), np.array([True, False, False])
        )
        assert not valid and np.array_equal(scores, np.zeros(3))
    scores, _, valid = alignment_scores(np.full((3, 3), np.nan))
    assert not valid and np.array_equal(scores, np.zeros(3))
    scores, _, valid = alignment_scores(None, np.ones(3, dtype=bool))
    assert not valid and scores.shape == (3,)


def test_zscore_uses_unbiased_std():
    z = zscore(np.array([1.0, 2.0, 3.0, 4.0]), clamp=10)
    np.testing.assert_allclose(z, (np.arange(1, 5) - 2.5) / (np.std(np.arange(1, 5), ddof=1) + STD_EPS))
    assert np.array_equal(zscore(np.array([5.0]), clamp=3), [0.0])


def test_reward_modes():
    scores = np.array([1.0, -0.5, -0.5])
    weights = np.array([0.6, 0.3, 0.1])
    reward, parts = reward_from_scores(scores, weights, "mixture")
    np.testing.assert_allclose(parts, [0.6, -0.15, -0.05])
    assert reward == pytest.approx(0.4)
    reward, parts = reward_from_scores(scores, weights, "reference")
    np.testing.assert_allclose(parts, scores)
    assert reward == pytest.approx(0.0)
    with pytest.raises(ValueError, match="reward mode"):
        reward_from_scores(scores, weights, "other")  # type: ignore[arg-type]


def signals(rows, counts, weights, skipped=False):
    k = len(counts)
    return TrainSignals(
        step=1,
        weights_K=np.asarray(weights, dtype=float),
        loss_K=np.ones(k),
        microbatches_K=np.asarray(counts),
        tokens_K=np.asarray(counts) * 10,
        loss=1.0,
        lr=1e-3,
        grad_norm=1.0,
        skipped=skipped,
        gram_KK=gram(rows),
    )


def test_compute_reward_uses_counts_for_presence_and_skips_bad_steps():
    rows = np.array([[1.0, 0.2], [0.9, 0.1], [0.0, 0.0], [-1.0, 0.0]])
    result = compute_reward(signals(rows, [2, 1, 0, 1], [0.4, 0.3, 0.1, 0.2]))
    assert result.valid and result.scores_K[2] == 0.0
    assert result.reward == pytest.approx(float(result.parts_K.sum()))
    assert result.scores_K[3] == result.scores_K.min()
    skipped = compute_reward(signals(rows, [2, 1, 0, 1], [0.4, 0.3, 0.1, 0.2], skipped=True))
    assert not skipped.valid and skipped.reward == 0.0 and np.array_equal(skipped.parts_K, np.zeros(4))


def unit(*xs):
    v = np.asarray(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_direction_reward_is_the_cosine_of_the_update_with_the_target_gradient():
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    counts = [2, 1, 1]  # realised shares m = [0.5, 0.25, 0.25]
    sig = signals(rows, counts, [0.5, 0.25, 0.25])
    result = compute_reward(sig, mode="direction", target_mask_K=np.array([True, True, False]), debias=False)
    m = np.array([0.5, 0.25, 0.25])
    update, target = m @ rows, rows[:2].mean(axis=0)
    expected = update @ target / (np.linalg.norm(update) * np.linalg.norm(target))
    assert result.valid and result.reward == pytest.approx(expected)
    assert result.parts_K.sum() == pytest.approx(expected)
    np.testing.assert_allclose(result.parts_K, m * (rows @ target) / (np.linalg.norm(update) * np.linalg.norm(target)))


def test_quadratic_reward_matches_its_formula():
    rows = np.array([[1.0, 0.5], [0.2, 1.0], [-1.0, 0.0]])
    sig = signals(rows, [1, 1, 2], [0.25, 0.25, 0.5])
    targets = np.array([True, True, False])
    result = compute_reward(sig, mode="quadratic", target_mask_K=targets, curvature=2.0, debias=False)
    g = gram(rows)
    m, t = np.array([0.25, 0.25, 0.5]), np.array([0.5, 0.5, 0.0])
    norm2 = t @ g @ t
    assert result.reward == pytest.approx(m @ g @ t / norm2 - 0.5 * 2.0 * m @ g @ m / norm2)


def test_direction_maximiser_is_interior_while_the_mixture_reward_is_maximised_at_a_vertex():
    """The reason for the redesign: with complementary targets (a shared direction plus their own) and
    an opposed junk domain, the cosine reward is highest for the even mixture of the targets, and the
    linear <w, s> reward is highest for all weight on one domain."""
    shared = np.eye(6)[0]
    rows = np.array(
        [a * shared + np.sqrt(1 - a * a) * np.eye(6)[i] for i, a in zip(range(1, 5), (0.7, 0.6, 0.6, 0.6), strict=True)]
        + [-shared + 0.3 * np.eye(6)[5]]
    )
    targets = np.array([True] * 4 + [False])
    g = gram(rows)
    t = targets / targets.sum()

    def cosine(w):
        return float(w @ g @ t / np.sqrt((w @ g @ w) * (t @ g @ t)))

    even = np.array([0.25] * 4 + [0.0])
    vertices = list(np.eye(5))
    tilted = np.array([0.4, 0.2, 0.2, 0.2, 0.0])
    with_junk = np.array([0.2] * 5)
    assert cosine(even) == pytest.approx(1.0)  # the target gradient itself
    assert cosine(even) > cosine(tilted) > max(cosine(v) for v in vertices)
    assert cosine(even) > cosine(with_junk)
    scores, _, _ = alignment_scores(g)
    linear = {name: reward_from_scores(scores, w, "mixture")[0] for name, w in [("even", even), ("tilted", tilted)]}
    best_vertex = max(reward_from_scores(scores, v, "mixture")[0] for v in vertices)
    # The linear reward pays more for one domain alone than for any spread of the targets.
    assert best_vertex > linear["tilted"] > linear["even"]


def test_direction_reward_is_invalid_without_a_present_target():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    sig = signals(rows, [0, 2, 2], [0.0, 0.5, 0.5])
    result = compute_reward(sig, mode="direction", target_mask_K=np.array([True, False, False]))
    assert not result.valid and result.reward == 0.0


def test_debiased_gram_diagonal_is_unbiased_for_the_mean_gradient_norm():
    """Over many draws the debiased diagonal averages to |mu|^2, the raw one to |mu|^2 + v / n."""
    rng = np.random.default_rng(0)
    mu = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    n = np.array([3, 1])
    raw, debiased = [], []
    for _ in range(4000):
        micro = [mu[i] + rng.normal(size=(n[i], 4)) for i in range(2)]
        means = np.array([m.mean(axis=0) for m in micro])
        sq = np.array([float((m**2).sum()) for m in micro])
        g = means @ means.T
        raw.append(np.diag(g))
        debiased.append(np.diag(debiased_gram(g, sq, n)))
    raw, debiased = np.mean(raw, axis=0), np.mean(debiased, axis=0)
    assert debiased[0] == pytest.approx(1.0, abs=0.08)  # |mu_0|^2 = 1; the raw one is 1 + 4/3
    assert raw[0] == pytest.approx(1.0 + 4.0 / 3.0, abs=0.1)
    assert debiased[1] == pytest.approx(raw[1])  # one micro-batch: nothing to debias with, kept raw
    np.testing.assert_array_equal(debiased_gram(np.eye(2), None, n), np.eye(2))
