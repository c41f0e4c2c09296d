"""Cost of the GradientProbe: LM env-step time and memory with the probe (exact, sketch) vs without.

The issue's goal: the probe adds under 2% to the step time at the tiny CPU scale. One process, one
``Pretrainer`` (``tiny`` preset by default, an in-memory random-token corpus of K domains), and three
variants that take turns in blocks of steps (the order rotates every round, so drift and other load
on the machine hit all variants alike):

* ``none``: the Pretrainer with no observer (no hooks), plus the observation maths;
* ``exact``: a ``GradientProbe`` in exact mode (K x P sums), plus the observation and reward maths;
* ``sketch``: the same in sketch mode (K x k CountSketch).

Reported per variant: median and interquartile range of the wall time per step, the ratio of medians
to ``none``, the Pretrainer's own ``time/probe_s`` share (end_microbatch, end_step and after_update;
the hooks themselves run inside backward), the bytes the probe holds, and on CUDA the peak memory.

It also prints the probe state per mode for every Pythia preset, computed by building each model on
the meta device and attaching the real probe (selection rule included), next to the reference's
22 x P fp32 matrix for 1B (4.43 GB).

Usage: ``.venv/bin/python benchmarks/bench_probe.py [--threads 1] [--rounds 6] [--block 3]``
(``--device cuda --preset pythia-1b --seq-len 1024`` on a GPU machine).
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

import torch  # noqa: E402

from envs.config import ProbeConfig  # noqa: E402
from envs.model import PRESETS, build_model  # noqa: E402
from envs.observation import ObservationState, build_observation  # noqa: E402
from envs.probe import GradientProbe  # noqa: E402
from envs.rewards import compute_reward  # noqa: E402

REFERENCE_BYTES = 22 * 3 * 2048 * 8192 * 4  # the reference's K x P fp32 matrix for 1B (docs/reference.md, B12)


class RandomCorpus:
    """In-memory corpus with the ``PreparedCorpus`` read interface: uniform random tokens per domain."""

    def __init__(self, num_domains: int, vocab_size: int, tokens_per_domain: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.domain_names = [f"d{i}" for i in range(num_domains)]
        self.vocab_size = vocab_size
        self.targets = [True] * num_domains
        self._tokens = {
            (k, split): rng.integers(1, vocab_size, size=n, dtype=np.int64)
            for k in range(num_domains)
            for split, n in (("train", tokens_per_domain), ("val", tokens_per_domain // 8))
        }

    def num_tokens(self, domain: int, split: str) -> int:
        return int(self._tokens[(domain, split)].size)

    def num_sequences(self, domain: int, split: str, seq_len: int) -> int:
        return (self.num_tokens(domain, split) - 1) // seq_len

    def read_sequences(self, domain: int, split: str, seq_idx: np.ndarray, seq_len: int) -> np.ndarray:
        stream = self._tokens[(domain, split)]
        return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in np.asarray(seq_idx)])


def experiment(args: argparse.Namespace):
    from ray_jobs.config import ExperimentConfig  # config models and YAML only; no Ray import

    return ExperimentConfig.from_dict(
        {
            "data": {
                "domains": [{"name": f"d{i}", "source": {"paths": ["unused"]}} for i in range(args.domains)]
            },
            "lm": {"preset": args.preset, "seq_len": args.seq_len, "num_threads": args.threads},
            "sampler": {"micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum},
            "train": {"total_steps": 10_000},
            "env": {"probe": {"sketch_dim": args.sketch_dim}},
        }
    )


def time_variants(args: argparse.Namespace) -> None:
    """Time the three variants in rotating blocks on one Pretrainer and print the comparison."""
    from envs.backends import LMBackend

    cfg = experiment(args)
    corpus = RandomCorpus(args.domains, args.vocab, tokens_per_domain=400 * args.seq_len * args.micro_batch)
    backend = LMBackend(cfg, corpus=corpus, device=args.device)
    backend.reset(0)
    trainer = backend.pretrainer
    trainer.set_observer(None)
    backend.probe.close()
    device = trainer.device
    k = args.domains
    rng = np.random.default_rng(0)
    variants = ["none", "exact", "sketch"]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    share: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, int] = dict.fromkeys(variants, 0)
    held: dict[str, dict[str, int]] = {}

    def one_step(probe: GradientProbe | None, state: ObservationState) -> ObservationState:
        """One env-equivalent step; records wall, CPU and probe seconds for the current variant."""
        weights = rng.dirichlet(np.ones(k))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        signals = trainer.train_step(weights)
        _, _, state = build_observation(
            signals, state, num_layers=backend.num_monitored_layers, total_steps=cfg.train.total_steps
        )
        t_reward = time.perf_counter()
        if probe is not None:
            compute_reward(signals)
        t_reward = time.perf_counter() - t_reward
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        if probe is not None:  # hooks (inside backward) + the Pretrainer's probe phase + reward maths
            share[current].append((probe.hook_seconds + signals.timings["probe"] + t_reward) / step_s)
            wall[current].append(step_s)
            cpu[current].append(time.process_time() - c0)
        elif current == "none":
            wall[current].append(step_s)
            cpu[current].append(time.process_time() - c0)
        return state

    current = "warmup"
    for _ in range(args.warmup):
        one_step(None, ObservationState())
    for r in range(args.rounds):
        for current in variants[r % 3 :] + variants[: r % 3]:
            probe = None
            if current != "none":
                probe_cfg = ProbeConfig(mode=current, sketch_dim=args.sketch_dim)
                probe = GradientProbe(trainer.model, probe_cfg, k, seed=1)
                held[current] = probe.state_bytes()
            trainer.set_observer(probe)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            state = ObservationState()
            for _ in range(args.block):
                state = one_step(probe, state)
            if device.type == "cuda":
                peak[current] = max(peak[current], torch.cuda.max_memory_allocated(device))
            trainer.set_observer(None)
            if probe is not None:
                probe.close()
    backend.close()
    report(args, device, variants, wall, cpu, share, peak, held)


def report(
    args: argparse.Namespace,
    device: torch.device,
    variants: list[str],
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    share: dict[str, list[float]],
    peak: dict[str, int],
    held: dict[str, dict[str, int]],
) -> None:
    """Print the per-variant table."""
    base, cpu_base = statistics.median(wall["none"]), statistics.median(cpu["none"])
    print(
        f"\nLM step, preset {args.preset}, device {device}, {args.threads or torch.get_num_threads()} thread(s), "
        f"K={args.domains}, micro-batch {args.micro_batch} x seq {args.seq_len}, grad_accum {args.grad_accum}, "
        f"{args.rounds} rounds x {args.block} steps per variant"
    )
    print(
        f"{'variant':8} {'wall med s':>10} {'wall IQR s':>15} {'wall ratio':>10} {'cpu med s':>9} "
        f"{'cpu IQR s':>15} {'cpu ratio':>9} {'probe share':>11} {'probe bytes':>12} {'peak MiB':>9}"
    )
    for v in variants:
        q1, _, q3 = statistics.quantiles(wall[v], n=4)
        c1, _, c3 = statistics.quantiles(cpu[v], n=4)
        med, cpu_med = statistics.median(wall[v]), statistics.median(cpu[v])
        probe_share = statistics.median(share[v]) if share[v] else 0.0
        peak_mib = f"{peak[v] / 2**20:.0f}" if device.type == "cuda" else "n/a"
        print(
            f"{v:8} {med:10.4f} {q1:7.4f}-{q3:7.4f} {med / base:10.4f} {cpu_med:9.4f} {c1:7.4f}-{c3:7.4f} "
            f"{cpu_med / cpu_base:9.4f} "
            f"{probe_share:11.4f} {sum(held.get(v, {}).values()):12,d} {peak_mib:>9}"
        )
    print(
        "probe share = median over steps of (seconds in the gradient hooks + the Pretrainer's probe phase\n"
        "+ reward maths) / step seconds, measured inside each step: unlike the ratios of medians it barely\n"
        "moves with other load on the machine. cpu = process CPU time (less sensitive to load than wall)."
    )


def state_table(num_domains: int, sketch_dim: int, num_layers: int) -> None:
    """Bytes the probe holds per mode for every preset, from the real probe on meta-device models."""
    from envs.config import LMConfig

    print(
        f"\nProbe state, K={num_domains}, k={sketch_dim}, L={num_layers} monitored (bytes; real probe on meta models)"
    )
    print(
        f"{'preset':12} {'P':>11} | {'exact sums':>14} {'weight copies':>13} {'exact total':>14} | "
        f"{'sketch sums':>11} {'hash cache':>11} {'w. sketches':>11} {'sketch total':>12} | {'exact/ref':>9}"
    )
    for name in PRESETS:
        model = build_model(LMConfig(preset=name), vocab_size=50_277, device="meta")
        cfg = ProbeConfig(num_monitored_layers=num_layers, sketch_dim=sketch_dim)
        ex = GradientProbe(model, cfg, num_domains).state_bytes()
        sk = GradientProbe(model, cfg.model_copy(update={"mode": "sketch"}), num_domains).state_bytes()
        print(
            f"{name:12} {ex['sums'] // (4 * num_domains):11,d} | {ex['sums']:14,d} {ex['weight_baseline']:13,d} "
            f"{sum(ex.values()):14,d} | {sk['sums']:11,d} {sk['sketch_hash_cache']:11,d} "
            f"{sk['weight_baseline']:11,d} {sum(sk.values()):12,d} | {ex['sums'] / REFERENCE_BYTES:9.3f}"
        )
    print(
        f"reference 1B K x P matrix: {REFERENCE_BYTES:,d} bytes ({REFERENCE_BYTES / 1e9:.2f} GB), all-reduced every step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--domains", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--sketch-dim", type=int, default=ProbeConfig().sketch_dim)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--table-only", action="store_true", help="only print the probe-state table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    state_table(22, args.sketch_dim, ProbeConfig().num_monitored_layers)
    if not args.table_only:
        time_variants(args)


if __name__ == "__main__":
    main()
