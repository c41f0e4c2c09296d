"""Cost of ``DomainSampler.plan_step`` per optimiser step, against one tiny-LM training step timed in the same run.

The issue's goal: the sampler must cost well under 1% of a training step. Scenarios:

* K=6, the CPU demo: 2 workers x grad_accum 2, micro-batch 8 (4 micro-batches per step);
* K=6, one process with grad_accum 16;
* K=22, the reference's Pile layout: 8 ranks x grad_accum 18, micro-batch 8 (144 micro-batches per step),
  ~1M sequences per domain (the first read of an epoch builds that domain's permutation: reported
  separately, as a per-epoch cost).

Weights change every step (Dirichlet draws), as under an agent. The LM baseline is ``Pretrainer.train_step``
on the ``tiny`` preset with an in-memory random-token corpus when ``envs.pretrainer`` imports (the real
step: sampling, batch assembly, forward/backward, AdamW); otherwise a minimal torch forward/backward of a
comparable 4-layer, width-128 causal transformer.

Usage: ``.venv/bin/python benchmarks/bench_sampler.py [--threads 2] [--lm-steps 8] [--sampler-steps 2000]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.sampler import DomainSampler, epoch_permutation  # noqa: E402

SCENARIOS = [
    # name, K, num_sequences per domain, micro_batch_size, grad_accum, world_size
    ("K=6 demo (W=2, GA=2)", 6, 20_000, 8, 2, 2),
    ("K=6 single (W=1, GA=16)", 6, 20_000, 8, 16, 1),
    ("K=22 Pile (W=8, GA=18)", 22, 1_000_000, 8, 18, 8),
]


def time_sampler(
    k: int, n: int, mbs: int, ga: int, world: int, rounding: str, steps: int
) -> tuple[float, float]:
    """(steady-state microseconds per plan_step, milliseconds to touch every domain's first epoch)."""
    rng = np.random.default_rng(0)
    weights_seq = rng.dirichlet(np.ones(k), size=steps)
    sampler = DomainSampler(
        [n] * k,
        micro_batch_size=mbs,
        grad_accum=ga,
        world_size=world,
        rank=world - 1,
        seed=0,
        rounding=rounding,
    )
    t0 = time.perf_counter()
    for d in range(k):  # builds each domain's permutation (what the first steps pay)
        sampler._permutation(d, 0)
    first_epoch_ms = (time.perf_counter() - t0) * 1e3
    for w_K in weights_seq[:50]:  # warm up
        sampler.plan_step(w_K)
    t0 = time.perf_counter()
    for w_K in weights_seq:
        sampler.plan_step(w_K)
    return (time.perf_counter() - t0) / steps * 1e6, first_epoch_ms


class _RandomCorpus:
    """The read interface of ``PreparedCorpus`` over random tokens in memory (benchmark only)."""

    def __init__(self, k: int, vocab_size: int, tokens_per_domain: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.domain_names = [f"d{i}" for i in range(k)]
        self.targets = [True] * k
        self.vocab_size = vocab_size
        self._tokens = {
            (d, split): rng.integers(0, vocab_size, size=tokens_per_domain, dtype=np.int64)
            for d in range(k)
            for split in ("train", "val")
        }

    def num_tokens(self, domain: int, split: str) -> int:
        return int(self._tokens[(domain, split)].shape[0])

    def num_sequences(self, domain: int, split: str, seq_len: int) -> int:
        return (self.num_tokens(domain, split) - 1) // seq_len

    def read_sequences(self, domain: int, split: str, seq_idx: np.ndarray, seq_len: int) -> np.ndarray:
        starts = np.asarray(seq_idx, dtype=np.int64) * seq_len
        return self._tokens[(domain, split)][starts[:, None] + np.arange(seq_len + 1)]


def time_pretrainer(steps: int, mbs: int, ga: int) -> tuple[str, list[float]]:
    """Seconds per ``Pretrainer.train_step`` of the tiny preset (K=6, the demo's batch)."""
    from envs.config import EvalConfig, LMConfig, OptimConfig, SamplerConfig
    from envs.pretrainer import Pretrainer

    corpus = _RandomCorpus(6, 8192, 200_000)
    trainer = Pretrainer(
        LMConfig(preset="tiny", seq_len=128),
        OptimConfig(),
        SamplerConfig(micro_batch_size=mbs, grad_accum=ga),
        EvalConfig(),
        corpus,
        total_steps=steps + 2,
        seed=0,
        device="cpu",
    )
    weights_K = np.full(6, 1 / 6)
    for _ in range(2):
        trainer.train_step(weights_K)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(weights_K)
        times.append(time.perf_counter() - t0)
    return "Pretrainer.train_step (tiny preset, K=6, 16 x 128 tokens)", times


def time_plain_torch(steps: int, batch: int) -> tuple[str, list[float]]:
    """Seconds per forward/backward/AdamW of a 4-layer width-128 causal transformer, vocab 8192, seq 128."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True, norm_first=True)
    body = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    emb, head = nn.Embedding(8192, 128), nn.Linear(128, 8192)
    params = [*emb.parameters(), *body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mask = nn.Transformer.generate_square_subsequent_mask(128)
    tokens = torch.randint(0, 8192, (batch, 129))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        logits = head(body(emb(tokens[:, :-1]), mask=mask, is_causal=True))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return f"plain torch fwd/bwd/AdamW (4 x 128, vocab 8192, {batch} x 128 tokens)", times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for the LM step")
    parser.add_argument("--lm-steps", type=int, default=8, help="timed LM steps (after 2 warm-up steps)")
    parser.add_argument("--sampler-steps", type=int, default=2000, help="timed plan_step calls per scenario")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    try:
        import envs.pretrainer  # noqa: F401

        label, lm_times = time_pretrainer(args.lm_steps, mbs=8, ga=2)
    except ImportError as exc:
        print(f"envs.pretrainer not importable ({exc}); timing a plain torch model instead")
        label, lm_times = time_plain_torch(args.lm_steps, batch=16)
    lm_ms = statistics.median(lm_times) * 1e3
    print(
        f"LM step baseline: {label}, torch threads {args.threads}: median {lm_ms:.1f} ms over {len(lm_times)} steps"
    )
    print()
    print(f"{'scenario':28s} {'rounding':18s} {'us/step':>9s} {'% of LM step':>13s} {'1st-epoch perms':>16s}")
    for name, k, n, mbs, ga, world in SCENARIOS:
        for rounding in ("largest_remainder", "systematic"):
            us, first_ms = time_sampler(k, n, mbs, ga, world, rounding, args.sampler_steps)
            share = us / 1e3 / lm_ms * 100
            print(f"{name:28s} {rounding:18s} {us:9.1f} {share:12.3f}% {first_ms:13.1f} ms")
    t0 = time.perf_counter()
    epoch_permutation(0, 0, 1, 1_000_000)
    perm_ms = (time.perf_counter() - t0) * 1e3
    steps_per_epoch = 1_000_000 / (144 / 22 * 8)  # uniform weights: sequences per domain per step
    print()
    print(
        f"epoch wrap cost: {perm_ms:.1f} ms per 1M-sequence domain, once every ~{steps_per_epoch:,.0f} steps at "
        f"uniform K=22 weights ({perm_ms / steps_per_epoch * 1e3:.2f} us/step amortised)"
    )


if __name__ == "__main__":
    main()
