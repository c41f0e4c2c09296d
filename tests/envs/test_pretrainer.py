"""Pretrainer: the domain-pure step against transformers, exact state, non-finite steps, validation."""

from __future__ import annotations

import copy
import io
import logging
import math

import numpy as np
import pytest
import torch

from envs.config import LMConfig, OptimConfig
from envs.data import PreparedCorpus
from envs.pretrainer import Pretrainer, WarmupCosine, WarmupStableDecay, lr_schedule, stable_checkpoint_step
from tests.envs.lm_fixtures import make_real_text_corpus, make_synthetic_corpus, tiny_configs

DOMAINS = ("alpha", "beta", "gamma")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> PreparedCorpus:
    return make_synthetic_corpus(tmp_path_factory.mktemp("corpus"), targets=[True, True, False])


def make(
    corpus: PreparedCorpus, *, total_steps: int = 20, seed: int = 0, optim: OptimConfig | None = None, **kw
):
    lm, default_optim, sampler, evaluation = tiny_configs(**kw)
    return Pretrainer(
        lm,
        optim or default_optim,
        sampler,
        evaluation,
        corpus,
        total_steps=total_steps,
        seed=seed,
        device="cpu",
    )


def hf_loss(model: torch.nn.Module, tokens_BT1: np.ndarray) -> torch.Tensor:
    """transformers' own causal-LM loss: it shifts the labels itself, so we pass the full sequences."""
    ids = torch.from_numpy(tokens_BT1)
    return model(input_ids=ids, labels=ids).loss


class RecordingObserver:
    """A StepObserver that records its calls and snapshots the gradients the optimizer will see."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: list[tuple] = []
        self.grads: dict[str, torch.Tensor] = {}

    def begin_step(self) -> None:
        self.calls.append(("begin_step",))

    def begin_microbatch(self, domain: int) -> None:
        self.calls.append(("begin_microbatch", domain))

    def end_microbatch(self) -> None:
        self.calls.append(("end_microbatch",))

    def end_step(self, microbatches_K: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(("end_step", microbatches_K.tolist()))
        self.grads = {
            n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None
        }
        return {"gram_KK": np.eye(len(microbatches_K))}

    def after_update(self) -> dict[str, np.ndarray]:
        self.calls.append(("after_update",))
        return {"weight_norms_L": np.array([1.0, 2.0])}


# ----------------------------------------------------------------------------------------------- the step
def test_microbatch_losses_equal_transformers_loss(corpus: PreparedCorpus) -> None:
    pt = make(corpus)
    model_before = copy.deepcopy(pt.model)
    plan = copy.deepcopy(pt.sampler).plan_step([0.5, 0.3, 0.2])
    sig = pt.train_step([0.5, 0.3, 0.2])
    ref_K = np.zeros(3)
    ref_losses = []
    with torch.no_grad():
        for mb in plan.local:
            loss = float(
                hf_loss(model_before, corpus.read_sequences(mb.domain, "train", mb.sequence_indices, 32))
            )
            ref_K[mb.domain] += loss / plan.quotas_K[mb.domain]
            ref_losses.append(loss)
    np.testing.assert_allclose(sig.loss_K[plan.quotas_K > 0], ref_K[plan.quotas_K > 0], rtol=1e-5)
    assert math.isclose(sig.loss, float(np.mean(ref_losses)), rel_tol=1e-5)


def test_update_uses_mean_gradient_over_the_global_batch(corpus: PreparedCorpus) -> None:
    pt = make(corpus)
    observer = RecordingObserver(pt.model)
    pt.set_observer(observer)
    model_before = copy.deepcopy(pt.model)
    plan = copy.deepcopy(pt.sampler).plan_step([0.6, 0.2, 0.2])
    pt.train_step([0.6, 0.2, 0.2])
    tokens = np.concatenate(
        [corpus.read_sequences(mb.domain, "train", mb.sequence_indices, 32) for mb in plan.local]
    )
    hf_loss(model_before, tokens).backward()  # one batch holding every micro-batch: the global mean loss
    for name, p in model_before.named_parameters():
        torch.testing.assert_close(observer.grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_signals_counts_schedule_and_observer_order(corpus: PreparedCorpus) -> None:
    pt = make(corpus, total_steps=10)  # warmup_fraction 0.1 -> 1 warmup step
    observer = RecordingObserver(pt.model)
    pt.set_observer(observer)
    sig = pt.train_step([1.0, 0.0, 0.0])
    assert sig.step == 1 and pt.step == 1 and not sig.skipped
    np.testing.assert_array_equal(sig.microbatches_K, [3, 0, 0])
    np.testing.assert_array_equal(sig.tokens_K, [3 * 2 * 32, 0, 0])
    assert sig.tokens == 192 and np.isfinite(sig.loss_K[0]) and np.isnan(sig.loss_K[1:]).all()
    assert sig.loss == pytest.approx(sig.loss_K[0])
    assert math.isfinite(sig.grad_norm) and sig.grad_norm > 0
    np.testing.assert_array_equal(sig.gram_KK, np.eye(3))
    np.testing.assert_array_equal(sig.weight_norms_L, [1.0, 2.0])
    assert set(sig.timings) == {"data", "forward_backward", "probe", "optimizer", "step"}
    assert all(v >= 0 for v in sig.timings.values())
    assert sig.timings["step"] >= sig.timings["forward_backward"] + sig.timings["optimizer"]
    expected = [("begin_step",)] + [("begin_microbatch", 0), ("end_microbatch",)] * 3
    assert observer.calls == expected + [("end_step", [3, 0, 0]), ("after_update",)]
    schedule = WarmupCosine(1, 10, 0.1)
    lrs = [sig.lr] + [pt.train_step([1, 1, 1]).lr for _ in range(9)]
    np.testing.assert_allclose(lrs, [3e-3 * schedule(s) for s in range(10)], rtol=1e-12)


def test_warmup_cosine_schedule_shape() -> None:
    schedule = WarmupCosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0
    assert schedule(12) == pytest.approx(0.55)
    assert schedule(20) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    values = [schedule(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_warmup_stable_decay_schedule_shape(shape: str) -> None:
    schedule = WarmupStableDecay(warmup_steps=4, total_steps=20, min_ratio=0.1, decay_steps=5, shape=shape)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [schedule(s) for s in range(4, 15)] == [1.0] * 11 and schedule.decay_start == 15
    decay = [schedule(s) for s in range(15, 20)]
    assert all(1.0 > a > b for a, b in zip(decay, decay[1:], strict=False))
    assert schedule(19) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    midway = {"linear": 0.1 + 0.9 * 0.6, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.4)),
              "1-sqrt": 0.1 + 0.9 * (1 - math.sqrt(0.4))}[shape]
    assert schedule(16) == pytest.approx(midway)


def test_wsd_steps_before_the_decay_do_not_depend_on_the_horizon() -> None:
    """What makes a wsd run extendable, and a cosine run not."""
    wsd = OptimConfig(schedule="wsd", decay_fraction=0.25, warmup_fraction=0.1)
    short, long = lr_schedule(wsd, 40), lr_schedule(wsd, 44)  # the same 4 warmup steps
    assert stable_checkpoint_step(wsd, 40) == 30 and stable_checkpoint_step(wsd, 44) == 33
    assert [short(s) for s in range(30)] == [long(s) for s in range(30)]
    long.extend(400, 100)  # an extension keeps the warmup it started with
    assert [short(s) for s in range(30)] == [long(s) for s in range(30)] and long.decay_start == 300
    cosine = OptimConfig(warmup_fraction=0.1)
    assert lr_schedule(cosine, 40)(20) != lr_schedule(cosine, 44)(20)
    assert stable_checkpoint_step(cosine, 40) is None


def test_no_weight_decay_on_biases_and_layernorms(corpus: PreparedCorpus) -> None:
    pt = make(corpus)
    decay, no_decay = pt.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in pt.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "gpt_neox.embed_in.weight" in decayed and "lm_head.weight" in decayed
    assert all(n.endswith(".bias") or "layernorm" in n or "layer_norm" in n for n in plain)
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert len(decayed) + len(plain) == len(names)


# ----------------------------------------------------------------------------------------------- exact state
def test_state_round_trip_continues_bit_identically(corpus: PreparedCorpus) -> None:
    weights = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1, 1, 1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [2, 1, 1]]
    a = make(corpus)
    for w in weights[:3]:
        a.train_step(w)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    cont_a = [a.train_step(w) for w in weights[3:]]

    b = make(corpus)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))  # plain tensors and values only
    assert b.step == 3
    cont_b = [b.train_step(w) for w in weights[3:]]
    for sa, sb in zip(cont_a, cont_b, strict=True):
        np.testing.assert_array_equal(sa.loss_K, sb.loss_K)
        assert (sa.step, sa.loss, sa.lr, sa.grad_norm) == (sb.step, sb.loss, sb.lr, sb.grad_norm)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.evaluate() == b.evaluate()


def test_a_wsd_state_from_before_the_decay_continues_under_a_longer_horizon(corpus: PreparedCorpus) -> None:
    """Extending a run: a 10-step wsd run's state at its decay start (step 8), loaded into a 14-step (the same one-step warmup)
    run, continues exactly as a 14-step (the same one-step warmup) run trained from the start; a state from inside the decay,
    or of a cosine run, is refused."""
    wsd = OptimConfig(lr=3e-3, warmup_fraction=0.1, schedule="wsd", decay_fraction=0.2)
    weights = ([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1, 1, 1], [0.0, 1.0, 0.0]] * 4)[:14]
    short = make(corpus, total_steps=10, optim=wsd)
    for w in weights[:8]:
        short.train_step(w)
    at_decay = copy.deepcopy(short.state_dict())  # state_dict holds references to the live tensors
    short.train_step(weights[8])
    inside_decay = short.state_dict()

    direct = make(corpus, total_steps=14, optim=wsd)
    expected = [direct.train_step(w) for w in weights]
    extended = make(corpus, total_steps=14, optim=wsd)
    extended.load_state_dict(copy.deepcopy(at_decay))
    got = [extended.train_step(w) for w in weights[8:]]
    for sa, sb in zip(expected[8:], got, strict=True):
        assert (sa.step, sa.loss, sa.lr, sa.grad_norm) == (sb.step, sb.loss, sb.lr, sb.grad_norm)
    assert [s.lr for s in got][-1] == pytest.approx(3e-3 * 0.1)
    with pytest.raises(ValueError, match=r"total_steps: saved 10, now 14"):
        make(corpus, total_steps=14, optim=wsd).load_state_dict(inside_decay)
    cosine = make(corpus, total_steps=10)
    cosine.train_step(weights[0])
    with pytest.raises(ValueError, match=r"total_steps: saved 10, now 14"):
        make(corpus, total_steps=14, optim=wsd).load_state_dict(cosine.state_dict())


def test_load_state_rejects_a_state_of_another_run(corpus: PreparedCorpus, tmp_path) -> None:
    other = make_synthetic_corpus(tmp_path / "other", domain_names=("alpha", "beta", "delta"))
    with pytest.raises(ValueError, match=r"domain_names: saved \['alpha', 'beta', 'gamma'\], now .*'delta'"):
        make(other).load_state_dict(make(corpus).state_dict())
    with pytest.raises(ValueError, match=r"total_steps: saved 20, now 30"):
        make(corpus, total_steps=30).load_state_dict(make(corpus).state_dict())
    with pytest.raises(ValueError, match="not a Pretrainer state"):
        make(corpus).load_state_dict({"model": {}})


# ----------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_loss_skips_the_update_then_stops_the_run(corpus: PreparedCorpus, caplog) -> None:
    pt = make(corpus, optim=OptimConfig(lr=3e-3, max_nonfinite_steps=2))
    pt.train_step([1, 1, 1])
    poison = {"on": True}
    pt.model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else None)
    params = {n: p.detach().clone() for n, p in pt.model.named_parameters()}
    adam_step = [s["step"].clone() for s in pt.optimizer.state.values()]
    with caplog.at_level(logging.WARNING, logger="envs.pretrainer"):
        sig = pt.train_step([1, 1, 1])
    assert sig.skipped and math.isnan(sig.loss) and math.isnan(sig.grad_norm) and sig.step == 2
    assert "non-finite" in caplog.text and "update skipped" in caplog.text
    for name, p in pt.model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is None
    assert [s["step"] for s in pt.optimizer.state.values()] == adam_step
    assert (pt.nonfinite_in_a_row, pt.nonfinite_total) == (1, 1)

    poison["on"] = False
    assert not pt.train_step([1, 1, 1]).skipped
    assert (pt.nonfinite_in_a_row, pt.nonfinite_total) == (0, 1)
    poison["on"] = True
    assert pt.train_step([1, 1, 1]).skipped
    with pytest.raises(RuntimeError, match=r"2 consecutive optimiser steps .*optim.max_nonfinite_steps=2"):
        pt.train_step([1, 1, 1])
    assert pt.state_dict()["nonfinite_total"] == 3


# ----------------------------------------------------------------------------------------------- validation
def test_evaluate_reports_every_domain_and_averages_targets_only(corpus: PreparedCorpus) -> None:
    pt = make(corpus, eval_batches=3, eval_batch_size=4)
    sampler_state = pt.sampler.state_dict()
    out = pt.evaluate()
    assert out == pt.evaluate()  # deterministic choice of sequences
    assert pt.sampler.state_dict() == sampler_state and pt.model.training
    loss_K = np.array([out[f"val/loss/{d}"] for d in DOMAINS])
    np.testing.assert_allclose([out[f"val/ppl/{d}"] for d in DOMAINS], np.exp(loss_K))
    idx = pt.validation_indices(0)
    n_val = corpus.num_sequences(0, "val", 32)
    assert idx.size == min(n_val, 12) and np.unique(idx).size == idx.size and idx.max() < n_val
    with torch.no_grad():
        ref = float(hf_loss(pt.model, corpus.read_sequences(0, "val", idx, 32)))
    assert out["val/loss/alpha"] == pytest.approx(ref, rel=1e-5)
    tokens_K = np.array([pt.validation_indices(k).size * 32 for k in range(3)], dtype=float)
    targets = [0, 1]  # gamma is target: false
    assert out["val/mean_ppl"] == pytest.approx(np.exp(loss_K[targets]).mean())
    assert out["val/geo_mean_ppl"] == pytest.approx(np.exp(loss_K[targets].mean()))
    weighted = np.exp((loss_K[targets] * tokens_K[targets]).sum() / tokens_K[targets].sum())
    assert out["val/weighted_ppl"] == pytest.approx(weighted)


@pytest.mark.slow
def test_training_lowers_every_real_domain_validation_loss(tmp_path) -> None:
    corpus = make_real_text_corpus(tmp_path / "real", vocab_size=512)
    lm, optim, sampler, evaluation = tiny_configs(
        seq_len=64, micro_batch_size=4, grad_accum=2, lr=2e-3, eval_batches=2, eval_batch_size=8
    )
    pt = Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=250, seed=0, device="cpu")
    before = pt.evaluate()
    for _ in range(250):
        sig = pt.train_step([1, 1, 1, 1])
    after = pt.evaluate()
    assert not sig.skipped
    for name in ("code", "licenses", "readmes"):
        assert after[f"val/loss/{name}"] < 0.75 * before[f"val/loss/{name}"], (name, before, after)
    # Uniform random tokens: no model beats their entropy ln(512) on held-out junk.
    assert after["val/loss/junk"] > math.log(512) - 0.1
    assert after["val/mean_ppl"] < 0.25 * before["val/mean_ppl"]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors(corpus: PreparedCorpus, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"lm.seq_len=4096 is longer than the context"):
        make(corpus, seq_len=4096)
    with pytest.raises(ValueError, match=r"weights must have length K=3"):
        make(corpus).train_step([0.5, 0.5])
    with pytest.raises(ValueError, match=r"domain 'beta' has -1"):
        make(corpus).train_step([1, -1, 1])
    lm, optim, sampler, evaluation = tiny_configs()
    with pytest.raises(ValueError, match="target_mask_K marks no domain"):
        Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=5, seed=0, target_mask_K=[0, 0, 0])
    with pytest.raises(ValueError, match="one entry per domain"):
        Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=5, seed=0, target_mask_K=[1, 1])
    with pytest.raises(ValueError, match="total_steps must be positive"):
        Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=0, seed=0)
    short = make_synthetic_corpus(tmp_path / "short", val_tokens=20)
    with pytest.raises(ValueError, match=r"validation splits shorter than one sequence .*'alpha': 20"):
        make(short)
    with pytest.raises(ValueError, match=r"differ from the configured domains"):
        PreparedCorpus.open(corpus.prepared_dir, expected_domains=["alpha", "beta", "delta"])


def test_num_threads_is_applied(corpus: PreparedCorpus) -> None:
    lm, optim, sampler, evaluation = tiny_configs()
    Pretrainer(
        LMConfig(**{**lm.model_dump(), "num_threads": 2}),
        optim,
        sampler,
        evaluation,
        corpus,
        total_steps=5,
        seed=0,
        device="cpu",
    )
    assert torch.get_num_threads() == 2


@pytest.mark.gpu
def test_gpu_bf16_and_compile_match_cpu_fp32(corpus: PreparedCorpus) -> None:
    lm, optim, sampler, evaluation = tiny_configs()
    cpu = Pretrainer(lm, optim, sampler, evaluation, corpus, total_steps=5, seed=0, device="cpu")
    auto = LMConfig(**{**lm.model_dump(), "precision": "auto"})
    gpu = Pretrainer(auto, optim, sampler, evaluation, corpus, total_steps=5, seed=0, device="cuda")
    compiled = LMConfig(**{**auto.model_dump(), "compile": True})
    gpu_compiled = Pretrainer(
        compiled, optim, sampler, evaluation, corpus, total_steps=5, seed=0, device="cuda"
    )
    assert gpu._autocast is torch.bfloat16 and next(gpu.model.parameters()).dtype == torch.float32
    for _ in range(3):
        ref, bf16, comp = (p.train_step([1, 2, 3]) for p in (cpu, gpu, gpu_compiled))
        np.testing.assert_allclose(bf16.loss_K, ref.loss_K, rtol=2e-2)  # bf16 autocast vs fp32
        np.testing.assert_allclose(comp.loss_K, bf16.loss_K, rtol=1e-2)
    out = gpu.evaluate()
    assert np.isfinite(out["val/mean_ppl"])
    state = gpu.state_dict()
    assert state["model"]["lm_head.weight"].is_cuda and "cuda" in state["rng"]
