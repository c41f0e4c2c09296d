"""Overhead of ``Pretrainer.train_step`` against a minimal hand-written torch loop, measured in one run.

Both sides train the same model (same init) on the same micro-batches with the same optimiser
(AdamW, same parameter groups, warmup+cosine, clipping, bf16 autocast on GPU):

* **ours**: ``Pretrainer.train_step(weights)``: sampler planning, memmap reads of the prepared corpus,
  per-micro-batch loss bookkeeping, the packed statistics reduction, non-finite checks, timings;
* **baseline**: the batches read into memory beforehand, then per step
  ``for x, y in micro_batches: (cross_entropy(model(x).logits, y) / G).backward()``, clip, AdamW,
  schedule, and one ``loss.item()`` for logging.

Throughput is measured in one process with the two alternating step by step (so both see the same
machine load), reported as the median step time. Peak memory is measured in two fresh subprocesses
(one per side): CPU = peak RSS growth over the RSS after set-up, GPU = ``torch.cuda.max_memory_allocated``.
On a GPU the script also reports MFU: ``(6 * N + 12 * L * d * T) * tokens/s / peak`` with N the
non-embedding parameters plus the LM head (PaLM's accounting), peak = 989 TFLOP/s dense bf16 (H100/H200).

Usage:
    .venv/bin/python benchmarks/bench_pretrainer.py                      # tiny, CPU, 1 thread
    .venv/bin/python benchmarks/bench_pretrainer.py --preset pythia-160m --device cuda --seq-len 2048 \\
        --micro-batch 16 --grad-accum 4 --vocab 50304 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.config import EvalConfig, LMConfig, OptimConfig, SamplerConfig  # noqa: E402
from envs.data import PreparedCorpus  # noqa: E402
from envs.pretrainer import Pretrainer, WarmupCosine, build_optimizer  # noqa: E402
from tests.envs.lm_fixtures import word_level_tokenizer, write_prepared_corpus  # noqa: E402

PEAK_BF16_FLOPS = 989e12
WEIGHTS = [0.5, 0.3, 0.2]


def make_corpus(out_dir: Path, vocab: int, tokens_per_domain: int) -> PreparedCorpus:
    """Three domains of random tokens (throughput does not depend on the text)."""
    rng = np.random.default_rng(0)
    streams = {}
    for name in ("a", "b", "c"):
        ids = rng.integers(1, vocab, size=tokens_per_domain)
        cut = tokens_per_domain * 9 // 10
        streams[name] = {"train": ids[:cut], "val": ids[cut:]}
    return write_prepared_corpus(out_dir, streams, word_level_tokenizer(vocab), shard_tokens=1 << 22)


def configs(args: argparse.Namespace) -> tuple[LMConfig, OptimConfig, SamplerConfig, EvalConfig]:
    lm = LMConfig(preset=args.preset, seq_len=args.seq_len, compile=args.compile)
    sampler = SamplerConfig(micro_batch_size=args.micro_batch, grad_accum=args.grad_accum)
    return lm, OptimConfig(lr=6e-4), sampler, EvalConfig()


class Baseline:
    """The hand-written loop, on the model and micro-batches of a fresh Pretrainer built with the same seed."""

    def __init__(self, args: argparse.Namespace, corpus: PreparedCorpus, steps: int) -> None:
        lm, optim_cfg, sampler_cfg, eval_cfg = configs(args)
        donor = Pretrainer(
            lm, optim_cfg, sampler_cfg, eval_cfg, corpus, total_steps=steps, seed=0, device=args.device
        )
        self.device = donor.device
        self.model = donor.model
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.autocast = donor._autocast
        self.optimizer = build_optimizer(self.model, optim_cfg, self.device)
        warmup = max(1, round(optim_cfg.warmup_fraction * steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup, steps, optim_cfg.min_lr_ratio)
        )
        self.clip = optim_cfg.grad_clip
        self.batches = []  # per step: list of (inputs, labels) already on the device
        for _ in range(steps):
            plan = donor.sampler.plan_step(WEIGHTS)
            step = []
            for mb in plan.local:
                t = torch.from_numpy(
                    corpus.read_sequences(mb.domain, "train", mb.sequence_indices, lm.seq_len)
                )
                t = t.to(self.device)
                step.append((t[:, :-1], t[:, 1:]))
            self.batches.append(step)
        del donor
        self.i = 0

    def step(self) -> float:
        micro = self.batches[self.i]
        self.i += 1
        total = torch.zeros((), device=self.device)
        for x, y in micro:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.forward(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(total.item())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(args: argparse.Namespace, side: str) -> dict[str, float]:
    """Peak memory of ``side`` over ``args.steps`` steps, in this (fresh) process."""
    corpus = PreparedCorpus.open(args.corpus)
    total = args.warmup + args.steps
    if side == "ours":
        pt = Pretrainer(*configs(args), corpus, total_steps=total, seed=0, device=args.device)
        run, device = (lambda: pt.train_step(WEIGHTS)), pt.device
    else:
        base = Baseline(args, corpus, total)
        run, device = base.step, base.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        start = rss_bytes()
    for _ in range(total):
        run()
    sync(device)
    if device.type == "cuda":
        return {
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "growth_mb": 0.0,
            "start_mb": start / 2**20,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": peak / 2**20, "growth_mb": (peak - start) / 2**20, "start_mb": start / 2**20}


def throughput(args: argparse.Namespace, corpus: PreparedCorpus) -> dict[str, float]:
    """Alternate ours and baseline step by step; median seconds per step of each."""
    total = args.warmup + args.steps
    pt = Pretrainer(*configs(args), corpus, total_steps=total, seed=0, device=args.device)
    base = Baseline(args, corpus, total)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    losses: dict[str, list[float]] = {"ours": [], "baseline": []}
    shares: list[float] = []
    for i in range(total):
        order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
        for side in order:
            sync(pt.device)
            t0 = time.perf_counter()
            if side == "ours":
                sig = pt.train_step(WEIGHTS)
                loss, t = sig.loss, sig.timings
                if i >= args.warmup:  # our own time outside forward/backward and the optimiser step
                    shares.append((t["step"] - t["forward_backward"] - t["optimizer"]) / t["step"])
            else:
                loss = base.step()
            sync(pt.device)
            if i >= args.warmup:
                times[side].append(time.perf_counter() - t0)
            losses[side].append(loss)
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    cfg = pt.model.config
    n = sum(p.numel() for p in pt.model.parameters()) - pt.model.gpt_neox.embed_in.weight.numel()
    flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq_len
    out = {
        "tokens_per_step": tokens,
        "first_loss_ours": losses["ours"][0],
        "first_loss_baseline": losses["baseline"][0],
        "bookkeeping_share": statistics.median(shares),
    }
    for side in times:
        med = statistics.median(times[side])
        out[f"{side}_step_s"] = med
        out[f"{side}_best_step_s"] = min(times[side])
        out[f"{side}_tokens_per_s"] = tokens / med
        out[f"{side}_mfu"] = (
            flops_per_token * tokens / med / PEAK_BF16_FLOPS if pt.device.type == "cuda" else float("nan")
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--memory-worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args, args.memory_worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokens = max(200_000, (args.warmup + args.steps) * args.micro_batch * args.grad_accum * args.seq_len)
        corpus = make_corpus(Path(tmp) / "corpus", args.vocab, tokens)
        res = throughput(args, corpus)
        mem = {}
        for side in ("ours", "baseline"):
            cmd = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--memory-worker",
                side,
                "--corpus",
                str(corpus.prepared_dir),
            ]
            mem[side] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
    print(
        f"setup: preset={args.preset} device={args.device} threads={args.threads} seq_len={args.seq_len} "
        f"micro_batch={args.micro_batch} grad_accum={args.grad_accum} vocab={args.vocab} "
        f"steps={args.steps} (+{args.warmup} warmup) compile={args.compile}"
    )
    print(f"first-step loss: ours {res['first_loss_ours']:.6f} baseline {res['first_loss_baseline']:.6f}")
    print(f"{'':10s} {'step_s':>9s} {'tokens/s':>10s} {'peak_MB':>9s} {'growth_MB':>10s} {'MFU':>6s}")
    for side in ("ours", "baseline"):
        print(
            f"{side:10s} {res[f'{side}_step_s']:9.4f} {res[f'{side}_tokens_per_s']:10.0f} "
            f"{mem[side]['peak_mb']:9.1f} {mem[side]['growth_mb']:10.1f} {res[f'{side}_mfu']:6.3f}"
        )
    ratio = res["ours_tokens_per_s"] / res["baseline_tokens_per_s"]
    print(
        f"tokens/s ratio ours/baseline (median steps): {ratio:.4f}  (overhead {100 * (1 / ratio - 1):+.2f}%)"
    )
    best = res["baseline_best_step_s"] / res["ours_best_step_s"]
    print(
        f"tokens/s ratio ours/baseline (fastest steps): {best:.4f}  (overhead {100 * (1 / best - 1):+.2f}%)"
    )
    print(
        f"ours outside forward/backward and optimiser (sampler, reads, reductions, checks): "
        f"{100 * res['bookkeeping_share']:.2f}% of step time (median, from TrainSignals.timings)"
    )
    print(f"peak memory ratio ours/baseline: {mem['ours']['peak_mb'] / mem['baseline']['peak_mb']:.4f}")


if __name__ == "__main__":
    main()
