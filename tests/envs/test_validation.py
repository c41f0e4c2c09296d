"""envs.validation: the validation metrics both backends report, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from envs.simulated import SimulatedBackend, SimulatedConfig
from envs.validation import validation_metrics


def test_metrics_by_hand() -> None:
    names = ["a", "b", "junk"]
    loss_sum_K = np.array([2.0 * 100, 4.0 * 300, 9.0 * 50])  # mean losses 2, 4, 9
    tokens_K = np.array([100, 300, 50])
    out = validation_metrics(names, loss_sum_K, tokens_K, np.array([True, True, False]))
    assert set(out) == {
        "val/loss/a", "val/loss/b", "val/loss/junk", "val/ppl/a", "val/ppl/b", "val/ppl/junk",
        "val/mean_ppl", "val/weighted_ppl", "val/geo_mean_ppl",
    }  # fmt: skip
    assert out["val/loss/b"] == pytest.approx(4.0) and out["val/ppl/junk"] == pytest.approx(math.exp(9.0))
    assert out["val/mean_ppl"] == pytest.approx((math.exp(2.0) + math.exp(4.0)) / 2)  # junk left out
    assert out["val/geo_mean_ppl"] == pytest.approx(math.exp(3.0))
    assert out["val/weighted_ppl"] == pytest.approx(math.exp((2.0 * 100 + 4.0 * 300) / 400))  # b weighs 3x


def test_equal_tokens_make_weighted_equal_geometric() -> None:
    loss_K = np.array([1.5, 2.5, 3.0])
    out = validation_metrics(["x", "y", "z"], loss_K, np.ones(3), np.ones(3, dtype=bool))
    assert out["val/weighted_ppl"] == out["val/geo_mean_ppl"] == pytest.approx(math.exp(loss_K.mean()))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"one value per domain \(2\)"):
        validation_metrics(["a", "b"], np.ones(3), np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="marks no domain"):
        validation_metrics(["a", "b"], np.ones(2), np.ones(2), np.zeros(2, dtype=bool))


def test_simulated_backend_reports_the_shared_metrics() -> None:
    backend = SimulatedBackend(SimulatedConfig(total_steps=5))
    backend.reset(seed=0)
    backend.step(np.full(backend.num_domains, 1.0 / backend.num_domains))
    loss_K = backend.expected_loss()
    expected = validation_metrics(backend.domain_names, loss_K, np.ones_like(loss_K), backend.target_mask_K)
    assert backend.evaluate() == expected
    assert expected["val/loss/junk"] == pytest.approx(loss_K[-1])
