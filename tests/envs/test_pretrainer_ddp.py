"""Pretrainer under 2-process gloo DDP on CPU equals one process over the same global micro-batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.envs.lm_fixtures import make_synthetic_corpus, one_step_record, one_step_worker, spawn_gloo

WEIGHTS = [0.5, 0.3, 0.2]
WORLD = 2
GRAD_ACCUM = 2
SEED = 3
# Adam's first step is lr * g / (|g| + eps) per element: with the default eps=1e-8 an element whose
# gradient is itself ~1e-8 turns the last-bit noise of the all-reduce's summation order (~1e-9 here)
# into ~1e-6 of parameter change. eps=1 makes the update a smooth function of the gradient, so the
# parameters must agree to fp32 tolerance; the gradients themselves are compared at any eps.
ADAM_EPS = 1.0


@pytest.mark.slow
def test_ddp_step_equals_single_process_over_the_same_microbatches(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    corpus = make_synthetic_corpus(tmp_path / "corpus")
    kwargs = {"grad_accum": GRAD_ACCUM, "seed": SEED, "adam_eps": ADAM_EPS}
    spawn_gloo(one_step_worker, WORLD, str(corpus.prepared_dir), WEIGHTS, kwargs, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # The sampler's global plan depends only on (seed, step, world_size * grad_accum): one process with
    # grad_accum = W * G processes exactly the micro-batches the two ranks share out.
    single = one_step_record(corpus, WEIGHTS, grad_accum=WORLD * GRAD_ACCUM, seed=SEED, adam_eps=ADAM_EPS)

    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["ddp"] for r in ranks)
    assert single["world_size"] == 1 and not single["ddp"]
    ref = single["signals"]
    for r in ranks:  # every rank returns the same global record
        sig = r["signals"]
        np.testing.assert_array_equal(sig.microbatches_K, ref.microbatches_K)
        np.testing.assert_array_equal(sig.tokens_K, ref.tokens_K)
        np.testing.assert_allclose(sig.loss_K, ref.loss_K, rtol=1e-9)
        assert sig.loss == pytest.approx(ref.loss, rel=1e-9)
        assert sig.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)
        assert r["end_counts"] == ref.microbatches_K.tolist()
        for key, value in single["eval_before"].items():  # same weights: equal up to summation order
            assert r["eval_before"][key] == pytest.approx(value, rel=1e-9), key
        for key, value in single["eval_after"].items():  # weights equal to fp32 tolerance
            assert r["eval_after"][key] == pytest.approx(value, rel=1e-5), key
        for name, grad in single["grads"].items():  # DDP-averaged gradients == the global-batch gradient
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, param in single["params"].items():
            torch.testing.assert_close(r["params"][name], param, rtol=1e-5, atol=1e-7, msg=name)
    update = max(float((single["params"][n] - p).abs().max()) for n, p in single["params_before"].items())
    assert update > 1e-5  # the step moved the parameters far more than the tolerance
    # Each rank saw only its own micro-batches (global entries r, r + W, ...) and together all of them.
    assert len(ranks[0]["observed_domains"]) == len(ranks[1]["observed_domains"]) == GRAD_ACCUM
    interleaved = [d for pair in zip(*(r["observed_domains"] for r in ranks), strict=True) for d in pair]
    assert interleaved == single["observed_domains"]
