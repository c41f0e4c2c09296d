"""GPU throughput and AC-ODM overhead for Pythia presets, on a synthetic corpus: one table, under 8 minutes.

For each preset (``pythia-160m``, then ``pythia-410m`` if the time budget allows) and each variant of
one optimiser step (``benchmarks.common.StepLoop``: a static mixture with no probe; the probe ``exact``
and ``sketch``; AC-ODM with the probe exact or sketch, as ``acodm train`` runs it under Ray: a ``Learner``
actor observes and updates on CPU, rank 0 acts from its own copy, ``ActingMixer``, which takes in the
newest published policy without waiting), on one device:

* median step time over ``--steps`` timed steps after ``--warmup`` untimed ones; tokens/s;
* MFU = 6 * N * tokens/s / peak, with N the parameters that do matmuls (all but the input embedding;
  the LM head counts) and peak = 989 TFLOP/s, the H100/H200 SXM dense bf16 figure (attention's own
  FLOPs are left out, as in the 6N rule);
* the step-time and peak-memory ratios of each variant to the static one (``torch.cuda``'s peak
  allocated memory on a GPU; peak RSS on CPU), and the probe's state in bytes;
* for AC-ODM, the agent's share of rank 0's step (``time/agent_s`` / step time, median) and the largest
  policy lag of the learner updates taken in.

The variants run one after the other (a dedicated GPU has no competing load to interleave against);
each is built fresh and freed before the next. The corpus is random tokens over the Pythia vocabulary
(50,277 tokens), 22 domains like The Pile, written once to a temporary directory in the real prepared
format, so nothing is downloaded. The defaults (2,048-token sequences, 8 x 22 micro-batches per step =
360k tokens, the reference's agent: 5 x 1024 networks) keep ``pythia-160m`` plus ``pythia-410m`` under
8 minutes on one H200; ``--budget-s`` skips a preset whose estimated time would overrun. The script
re-executes itself with the allocator settings of a training process (``ray_jobs.allocator``) and gives
its local Ray the same settings, as ``acodm train`` does.

``--smoke`` runs the same code on CPU with the ``tiny`` preset, 4 domains and 2 timed steps, to test the
script anywhere (its MFU column is n/a).

Usage::

    .venv/bin/python benchmarks/gpu.py                 # on a GPU machine
    .venv/bin/python benchmarks/gpu.py --smoke         # CPU smoke test (about a minute)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    VARIANT_LABELS,
    StepLoop,
    append_section,
    command_line,
    fmt_bytes,
    format_load,
    git_revision,
    machine_summary,
    markdown_table,
    peak_rss_bytes,
    ray_init,
    reset_peak_rss,
    run_with_allocator_env,
    synthetic_corpus,
    synthetic_experiment,
    utc_now,
)

log = logging.getLogger("gpu")

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 (NVIDIA data sheet; sparsity doubles it)
PYTHIA_VOCAB = 50277  # tokenizer size; the model pads it to 50,304
VARIANT_ORDER = ("static", "exact", "sketch", "ac_odm", "ac_odm_sketch")
REFERENCE_AGENT = {"hidden_width": 1024, "num_hidden_layers": 5, "batch_size": 32, "warmup_fraction": 0.0}
SMOKE_AGENT = {"hidden_width": 64, "num_hidden_layers": 2, "batch_size": 8, "warmup_fraction": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny preset, few steps")
    p.add_argument(
        "--presets", nargs="+", default=None, help="LM presets in order (default pythia-160m pythia-410m)"
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANT_ORDER), choices=VARIANT_ORDER)
    p.add_argument("--domains", type=int, default=None, help="K (default 22; smoke 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per micro-batch (default 8; smoke 2)"
    )
    p.add_argument(
        "--grad-accum", type=int, default=None, help="micro-batches per step (default 22; smoke 4)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip presets that would end past this (s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the LM (adds compile time)")
    p.add_argument("--device", default=None, help="default: cuda if available (smoke: cpu)")
    p.add_argument(
        "--results", type=Path, default=None, help="append the table to this file (e.g. RESULTS.md)"
    )
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "presets": ["tiny"] if smoke else ["pythia-160m", "pythia-410m"],
        "domains": 4 if smoke else 22,
        "seq_len": 64 if smoke else 2048,
        "micro_batch": 2 if smoke else 8,
        "grad_accum": 4 if smoke else 22,
        "steps": 2 if smoke else 8,
        "warmup": 1 if smoke else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        import torch

        if not smoke and not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke on CPU (or pass --device cpu to force the full sizes)")
        args.device = "cpu" if smoke else "cuda"
    return args


def matmul_params(model: Any) -> int:
    """Parameters that take part in matmuls: everything except the input embedding table."""
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed


def run_variant(name: str, cfg: Any, args: argparse.Namespace, agent: dict[str, Any]) -> dict[str, Any]:
    """Build one variant, warm it up, time its steps and measure its peak memory; then free it."""
    import torch

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loop = StepLoop(name, cfg, device=args.device, agent_overrides=agent, agent_cpus=1.0)
    try:
        for _ in range(args.warmup):
            loop.step()
        if not cuda:
            reset_peak_rss()
        loop.wait_for_learner()  # the warm-up's updates are not charged to the timed steps
        loop.clear_times()
        times = [loop.step() for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
        n = matmul_params(loop.backend.pretrainer.model)
        agent = loop.agent_summary()
        if agent:
            agent["share"] = statistics.median(loop.agent_s) / statistics.median(loop.wall_s)
        probe = loop.probe_bytes
    finally:
        loop.close()
    return {"median_s": statistics.median(times), "peak": peak, "n": n, "probe": probe, "agent": agent}


def bench_preset(preset: str, prepared: Path, names: list[str], args: argparse.Namespace) -> list[list[str]]:
    """Every variant of one preset; the table rows."""
    overrides = {
        "lm.preset": preset,
        "lm.seq_len": args.seq_len,
        "lm.compile": args.compile,
        "sampler.micro_batch_size": args.micro_batch,
        "sampler.grad_accum": args.grad_accum,
        "train.total_steps": 10 * (args.warmup + args.steps) + 100,
        "agent.device": "cpu",
    }
    cfg = synthetic_experiment(prepared, names, overrides)
    agent = SMOKE_AGENT if args.smoke else REFERENCE_AGENT
    tokens_per_step = args.seq_len * args.micro_batch * args.grad_accum
    results = {}
    for name in args.variants:
        log.info("%s / %s (%s)", preset, name, format_load())
        results[name] = run_variant(name, cfg, args, agent)
    base = results.get("static")
    rows = []
    for name, r in results.items():
        tok_s = tokens_per_step / r["median_s"]
        mfu = "n/a" if args.smoke else f"{6 * r['n'] * tok_s / PEAK_BF16_FLOPS:.1%}"
        t_ratio = f"{r['median_s'] / base['median_s']:.3f}" if base else "n/a"
        m_ratio = f"{r['peak'] / base['peak']:.3f}" if base else "n/a"
        agent = r["agent"]
        lag = (
            f"{agent['share']:.2%} of the step; {agent['taken']:.0f} updates taken in, policy lag max "
            f"{agent['max_policy_lag']:.0f}"
            if agent
            else "\u2014"
        )
        rows.append(
            [
                preset,
                VARIANT_LABELS[name],
                f"{r['median_s']:.3f}",
                f"{tok_s:,.0f}",
                mfu,
                t_ratio,
                fmt_bytes(r["peak"]),
                m_ratio,
                fmt_bytes(r["probe"]),
                lag,
            ]
        )
    return rows


def param_count(preset: str) -> int:
    """Approximate matmul parameters of a preset (12 L d^2 + vocab d), for the time-budget estimate."""
    from envs.model import PRESETS

    shape = PRESETS[preset]
    return 12 * shape.num_layers * shape.hidden_size**2 + 50304 * shape.hidden_size


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, benchmark each preset that fits the budget, print (and maybe append) the table."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    run_with_allocator_env(argv)  # this process runs the loops: a training process's allocator settings
    start = time.perf_counter()
    import ray

    ray_init()
    rows: list[list[str]] = []
    notes: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="acodm-gpu-bench-") as tmp:
            tokens = max(200_000, 4 * args.seq_len * args.micro_batch)
            names = synthetic_corpus(
                tmp,
                num_domains=args.domains,
                vocab_size=PYTHIA_VOCAB,
                train_tokens=tokens,
                val_tokens=4 * (args.seq_len + 1),
            )
            last: tuple[str, float] | None = None
            for preset in args.presets:
                elapsed = time.perf_counter() - start
                if last is not None:
                    estimate = last[1] * param_count(preset) / param_count(last[0])
                    if elapsed + estimate > args.budget_s:
                        notes.append(
                            f"{preset} skipped: estimated {estimate:.0f} s after {elapsed:.0f} s would pass "
                            f"the {args.budget_s:.0f} s budget"
                        )
                        log.warning(notes[-1])
                        continue
                t0 = time.perf_counter()
                rows += bench_preset(preset, Path(tmp), names, args)
                last = (preset, time.perf_counter() - t0)
    finally:
        ray.shutdown()
    header = [
        "preset",
        "variant",
        "median step s",
        "tokens/s",
        "MFU (6N)",
        "step time / static",
        "peak memory",
        "memory / static",
        "probe state",
        "AC-ODM agent on rank 0 (median)",
    ]
    text = "\n".join(
        [
            "## GPU throughput and AC-ODM overhead (benchmarks/gpu.py)"
            + (" --smoke on CPU" if args.smoke else ""),
            f"- Command: `{command_line()}`; date {utc_now()}; revision {git_revision()}",
            f"- Machine: {machine_summary()}; {format_load()}",
            f"- {args.domains} synthetic domains, vocabulary {PYTHIA_VOCAB}, {args.grad_accum} micro-batches "
            f"of {args.micro_batch} x {args.seq_len} tokens per step; {args.warmup} warm-up + {args.steps} "
            f"timed steps per variant; MFU peak {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16; total wall "
            f"{time.perf_counter() - start:.0f} s",
            *[f"- {n}" for n in notes],
            "",
            markdown_table(header, rows),
            "",
        ]
    )
    print(text)
    if args.results is not None:
        append_section(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
