"""GradientProbe: parameter selection, hook capture vs separate backward passes, sketch statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.config import ProbeConfig
from envs.probe import (
    CountSketch,
    GradientProbe,
    gram_matrix,
    select_monitored_blocks,
    select_reward_blocks,
)

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, MB = 50, 12, 2


def tiny_model(num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


def micro_batches(domains: list[int], seed: int = 1) -> list[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # Domain d draws tokens from its own slice of the vocabulary, so domains really differ.
    out = []
    for d in domains:
        lo = 10 * d
        out.append((d, torch.randint(lo, lo + 20, (MB, SEQ), generator=gen)))
    return out


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def test_reward_block_rule_matches_reference_depths():
    assert select_reward_blocks(16, 3) == [11, 13, 15]  # reference 1B: sequential 13/15/17
    assert select_reward_blocks(24, 3) == [19, 21, 23]  # reference 410M: sequential 21/23/25
    assert select_reward_blocks(4, 3) == [1, 3]
    assert select_reward_blocks(1, 3) == [0]


@pytest.mark.parametrize("num_blocks,num_layers", [(16, 9), (24, 9), (6, 9), (2, 1), (12, 4)])
def test_monitored_blocks_are_evenly_spaced_and_distinct(num_blocks, num_layers):
    blocks = select_monitored_blocks(num_blocks, num_layers)
    assert len(blocks) == min(num_blocks, num_layers) == len(set(blocks))
    assert blocks == sorted(blocks) and blocks[-1] == num_blocks - 1
    if len(blocks) > 1:
        assert blocks[0] == 0
        gaps = np.diff(blocks)
        assert gaps.max() - gaps.min() <= 1


def test_probe_selects_default_params_and_patterns():
    model = tiny_model(num_layers=6)
    probe = GradientProbe(model, ProbeConfig(num_monitored_layers=3), num_domains=2)
    assert probe.param_names == [f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight" for i in (1, 3, 5)]
    assert probe.monitored_blocks == [0, 2, 5] or probe.monitored_blocks == [0, 3, 5]
    probe.close()
    probe = GradientProbe(model, ProbeConfig(param_patterns=[r"layers\.0\.attention\.dense"]), num_domains=2)
    assert probe.param_names == [
        "gpt_neox.layers.0.attention.dense.weight",
        "gpt_neox.layers.0.attention.dense.bias",
    ]
    probe.close()
    with pytest.raises(ValueError, match="match no parameter"):
        GradientProbe(model, ProbeConfig(param_patterns=["nothing_like_this"]), num_domains=2)


def run_step(model, probe, batches, num_domains):
    """One accumulation step the way a Pretrainer runs it (no zero_grad between micro-batches)."""
    probes = probe if isinstance(probe, list) else [probe]
    for pr in probes:
        pr.begin_step()
    for d, tokens in batches:
        for pr in probes:
            pr.begin_microbatch(d)
        (lm_loss(model, tokens) / len(batches)).backward()
        for pr in probes:
            pr.end_microbatch()
    counts = np.bincount([d for d, _ in batches], minlength=num_domains)
    return counts


def oracle_means(model, probe, batches, num_domains, scale):
    """Per-domain mean gradients from separate autograd.grad calls, one per micro-batch."""
    params = [p for _, p in probe.params]
    rows = torch.zeros(num_domains, probe.num_values, dtype=torch.float64)
    counts = np.bincount([d for d, _ in batches], minlength=num_domains)
    for d, tokens in batches:
        grads = torch.autograd.grad(lm_loss(model, tokens) * scale, params)
        rows[d] += torch.cat([g.reshape(-1) for g in grads]).double()
    for d in range(num_domains):
        if counts[d]:
            rows[d] /= counts[d]
    return rows


def test_hooks_equal_per_domain_gradients_from_separate_backward_passes():
    torch.set_num_threads(1)
    model = tiny_model()
    k = 4  # domain 3 is absent this step
    batches = micro_batches([0, 2, 0, 1, 2, 0])
    probe = GradientProbe(model, ProbeConfig(), num_domains=k)
    counts = run_step(model, probe, batches, k)
    means = probe.mean_gradients(counts).double()
    oracle = oracle_means(model, probe, batches, k, scale=1 / len(batches))
    torch.testing.assert_close(means, oracle, rtol=1e-5, atol=1e-9)
    assert torch.count_nonzero(means[3]) == 0
    # The hooks did not disturb normal accumulation into .grad.
    p = probe.params[0][1]
    torch.testing.assert_close(
        p.grad.reshape(-1).double(), (oracle[:3] * torch.tensor(counts[:3, None])).sum(0)[: p.numel()]
    )
    probe.close()


def test_end_step_sums_each_microbatch_squared_gradient_norm_per_domain():
    """``microbatch_sqnorm_K`` is the per-domain sum of each micro-batch's squared gradient norm (what
    the reward needs to debias the Gram diagonal), in exact and sketch mode alike."""
    torch.set_num_threads(1)
    k = 4
    batches = micro_batches([0, 2, 0, 1, 2, 0])
    for mode in ("exact", "sketch"):
        model = tiny_model()
        probe = GradientProbe(model, ProbeConfig(mode=mode, sketch_dim=64), num_domains=k)
        counts = run_step(model, probe, batches, k)
        got = probe.end_step(counts)["microbatch_sqnorm_K"]
        params = [p for _, p in probe.params]
        expected = np.zeros(k)
        for d, tokens in batches:
            grads = torch.autograd.grad(lm_loss(model, tokens) / len(batches), params)
            expected[d] += sum(float(g.double().square().sum()) for g in grads)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        assert got[3] == 0.0
        probe.close()


def test_end_step_gram_and_reset_between_steps():
    model = tiny_model()
    probe = GradientProbe(model, ProbeConfig(), num_domains=3)
    batches = micro_batches([0, 1, 2, 1])
    run_step(model, probe, batches, 3)
    model.zero_grad()
    batches2 = micro_batches([2, 2, 0, 1], seed=7)
    counts = run_step(model, probe, batches2, 3)  # begin_step must forget the first step
    gram = probe.end_step(counts)["gram_KK"]
    oracle = oracle_means(model, probe, batches2, 3, scale=1 / 4)
    np.testing.assert_allclose(gram, (oracle @ oracle.T).numpy(), rtol=1e-5)
    probe.close()


def test_weight_norms_and_deltas_follow_the_update():
    model = tiny_model()
    probe = GradientProbe(model, ProbeConfig(num_monitored_layers=2), num_domains=2)
    blocks = [model.gpt_neox.layers[i].mlp.dense_4h_to_h.weight for i in probe.monitored_blocks]
    before = [w.detach().clone() for w in blocks]
    with torch.no_grad():
        for w in blocks:
            w.add_(0.01)
    out = probe.after_update()
    np.testing.assert_allclose(out["weight_norms_L"], [w.norm().item() for w in blocks], rtol=1e-6)
    np.testing.assert_allclose(
        out["weight_delta_norms_L"],
        [(w - b).norm().item() for w, b in zip(blocks, before, strict=True)],
        rtol=1e-5,
    )
    out2 = probe.after_update()  # no change since the previous step
    np.testing.assert_allclose(out2["weight_delta_norms_L"], 0.0, atol=0)
    probe.close()

    initial = GradientProbe(
        model, ProbeConfig(num_monitored_layers=2), num_domains=2, delta_baseline="initial"
    )
    start = [w.detach().clone() for w in blocks]
    for _ in range(2):
        with torch.no_grad():
            for w in blocks:
                w.add_(0.01)
        out = initial.after_update()
    np.testing.assert_allclose(
        out["weight_delta_norms_L"],
        [(w - s).norm().item() for w, s in zip(blocks, start, strict=True)],
        rtol=1e-5,
    )
    state = initial.state_dict()
    fresh = GradientProbe(model, ProbeConfig(num_monitored_layers=2), num_domains=2, delta_baseline="initial")
    fresh.load_state_dict(state)
    np.testing.assert_allclose(
        fresh.after_update()["weight_delta_norms_L"], out["weight_delta_norms_L"], rtol=1e-6
    )
    with pytest.raises(ValueError, match="probe state mismatch"):
        GradientProbe(
            model, ProbeConfig(mode="sketch"), num_domains=2, delta_baseline="initial"
        ).load_state_dict(state)


def test_sketch_probe_is_the_sketch_of_the_exact_means():
    model = tiny_model()
    batches = micro_batches([0, 1, 2, 0, 1])
    exact = GradientProbe(model, ProbeConfig(), num_domains=3)
    sketch = GradientProbe(model, ProbeConfig(mode="sketch", sketch_dim=64), num_domains=3, seed=5)
    counts = run_step(model, [exact, sketch], batches, 3)
    sketch_means = sketch.mean_gradients(counts)  # both probes saw the same backward passes
    exact_means = exact.mean_gradients(counts)
    projector = CountSketch(64, seed=5)
    expected = torch.stack([projector.project(row) for row in exact_means])
    torch.testing.assert_close(sketch_means, expected, rtol=1e-5, atol=1e-7)
    exact.close()
    sketch.close()


def correlated_vectors(p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, generator=gen)
    x = shared + 0.8 * torch.randn(p, generator=gen)
    y = 0.5 * shared + torch.randn(p, generator=gen)
    return x, y


def test_sketch_inner_products_are_unbiased_over_seeds():
    x, y = correlated_vectors(5000, seed=0)
    true = float(x @ y)
    k, seeds = 64, 400
    estimates = np.array(
        [float(CountSketch(k, s).project(x) @ CountSketch(k, s).project(y)) for s in range(seeds)]
    )
    stderr = estimates.std(ddof=1) / math.sqrt(seeds)
    # Unbiased: the mean over seeds is within 4 standard errors of the truth (the single-draw error is
    # about sqrt(seeds) = 20 times larger, so a biased estimator would fail this).
    assert abs(estimates.mean() - true) < 4 * stderr
    bound = math.sqrt((float(x @ x) * float(y @ y) + true**2) / k)
    assert estimates.std(ddof=1) < 1.1 * bound  # variance bound (|x|^2|y|^2 + <x,y>^2) / k


def test_sketch_error_at_default_k_is_within_the_stated_bound():
    """Stated bound: RMS over seeds of |<Sx,Sy> - <x,y>| / (|x||y|) <= 1.25 * sqrt((1 + cos^2) / k)."""
    k = ProbeConfig().sketch_dim
    x, y = correlated_vectors(50_000, seed=3)  # P >> k, as for any real model
    true = float(x @ y)
    scale = float(x.norm() * y.norm())
    cos = true / scale
    errors = [
        (float(CountSketch(k, s).project(x) @ CountSketch(k, s).project(y)) - true) / scale
        for s in range(100)
    ]
    rms = math.sqrt(np.mean(np.square(errors)))
    bound = math.sqrt((1 + cos**2) / k)
    assert rms <= 1.25 * bound, f"rms relative error {rms:.4f} above 1.25 x {bound:.4f}"
    assert rms > 0.3 * bound  # the sketch really is approximate: the test measures something


def test_gram_matrix_chunks_match_dense():
    rows = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(gram_matrix(rows), (rows.double() @ rows.double().T).numpy(), rtol=1e-12)


def test_sketch_mode_estimates_weight_change_without_copies():
    model = tiny_model()
    cfg = ProbeConfig(mode="sketch", num_monitored_layers=3)
    probe = GradientProbe(model, cfg, num_domains=2, seed=3)
    assert probe.state_bytes()["weight_baseline"] == 3 * cfg.sketch_dim * 4  # k floats per layer
    blocks = [model.gpt_neox.layers[i].mlp.dense_4h_to_h.weight for i in probe.monitored_blocks]
    before = [w.detach().clone() for w in blocks]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in blocks:
            w.add_(0.01 * torch.randn(w.shape, generator=gen))
    out = probe.after_update()
    exact = np.array([(w - b).norm().item() for w, b in zip(blocks, before, strict=True)])
    np.testing.assert_allclose(out["weight_norms_L"], [w.norm().item() for w in blocks], rtol=1e-6)  # exact
    # relative std of the estimate is about sqrt(2/k) = 2.2% at k = 4096; allow 4.5 of them
    np.testing.assert_allclose(out["weight_delta_norms_L"], exact, rtol=0.1)
    probe.close()
