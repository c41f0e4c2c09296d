"""Overhead of AC-ODM's machinery on the tiny CPU LM, measured in one run against a static mixture.

Four parts, all on the base config ``configs/bench-demo.yaml`` (the demo corpus, the tiny GPT-NeoX, one
torch thread, 16 micro-batches of 1 x 64 tokens per optimiser step). AC-ODM runs as ``acodm train``
runs it under Ray (``ray_jobs.train._make_mixer``): a ``Learner`` Ray actor observes and updates; rank 0
acts from its own copy (``ActingMixer``), which takes in the newest policy the learner has published
without waiting (non-blocking ``ray.wait``) and submits each transition to the learner without waiting.

1. **Step time** of one loop iteration in four variants (``benchmarks.common.StepLoop``): ``static``, a
   static mixture with no probe (the Pretrainer alone); ``exact`` and ``sketch``, the probe in that mode
   (env step with hooks, Gram matrix, observation and reward; static mixer); ``ac_odm``, AC-ODM with the
   probe exact. All four live in this process and take turns in blocks of steps, the order rotating
   every round, so machine load hits them alike. Reported: min / median / max wall ms per step and the
   ratio of medians to the static variant and, for AC-ODM, to ``exact`` (what the agent adds on top of
   the probe); the agent's time on rank 0 per step (``act`` + building the ``Transition`` + ``observe``
   + ``update``, the run loop's ``time/agent_s``) and its share of the step (``agent_s`` / wall, per
   step: min / median / max), the steadier measure on a loaded machine; this process's CPU time and
   the learner's CPU time per step; the policy lag of the updates taken in.
2. **An agent slower than the LM** (``slow`` part): AC-ODM with ``updates_per_step`` raised
   (``--slow-updates``, default 200) so that each step's update outlasts an LM step, taking turns in
   blocks with the ``exact`` variant (the same step without the agent). After each AC-ODM block the
   script waits, untimed, for the learner to catch up (so its backlog does not run into the next block;
   how long that took is reported). Reported: ``act`` and the agent's rank-0 time per step and its
   share, the step's wall time against ``exact``, the learner's CPU time per step, and the policy lag
   (transitions submitted that the acting policy had not learned from when an update was taken in):
   ``act`` must stay at its local cost whatever an update costs, the lag grows instead.
3. **Peak memory** of each variant in a fresh subprocess (peak RSS, Linux ``VmHWM``), and for AC-ODM the
   learner process's peak RSS too (Ray's own daemons are not counted).
4. **In-process loop vs 1-worker Ray Train** (``run_local`` and ``run_train`` alternating, starting and
   ending in-process, same config, static uniform mixer): median wall seconds per step from the ledgers'
   ``wall_time`` (evaluation and checkpoint steps excluded), and the ratio of Ray Train to the mean of
   the in-process runs; Ray Train's fixed start-up and tear-down time (starting and stopping the local
   Ray included) is reported apart.

The script re-executes itself with the allocator settings of a training process
(``ray_jobs.allocator.ALLOCATOR_ENV``) and gives its local Ray the same settings through the job's
runtime environment, as ``acodm train`` does. The machine this runs on may be shared; the load average
is printed with the numbers.

Usage: ``.venv/bin/python benchmarks/overhead.py [--rounds 4] [--block 4] [--train-steps 40]
[--skip steps slow memory train] [--results FILE]`` (about 5 minutes on 2 shared cores with the
defaults; ``--results`` appends the section to FILE; smoke test:
``--rounds 1 --block 2 --warmup 2 --slow-updates 20 --skip memory train``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    VARIANT_LABELS,
    VARIANTS,
    StepLoop,
    TimeSummary,
    allocator_summary,
    append_section,
    command_line,
    fmt_bytes,
    format_load,
    git_revision,
    interleave,
    machine_summary,
    markdown_table,
    peak_rss_bytes,
    ray_init,
    rss_bytes,
    run_with_allocator_env,
    utc_now,
)

from ray_jobs.config import ExperimentConfig, load_config

log = logging.getLogger("overhead")

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench-demo.yaml"
# The steady state of AC-ODM: no ODM warmup, so every decision is the policy's and every step updates.
AGENT_OVERRIDES = {"warmup_fraction": 0.0}
DASH = "\u2014"


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    """The benchmark's config: the base YAML with a budget that outlasts every variant's steps."""
    steps = max(args.train_steps, args.rounds * args.block + args.warmup + 10, 1000)
    return load_config(
        args.config,
        [
            f"train.total_steps={steps}",
            f"lm.num_threads={args.threads}",
            "tracking.enabled=false",
            "ray.enabled=false",
            *args.set,
        ],
    )


def _ms3(s: TimeSummary, digits: int = 0) -> str:
    """``min / median / max`` in ms."""
    return f"{s.min * 1e3:.{digits}f} / {s.median * 1e3:.{digits}f} / {s.max * 1e3:.{digits}f}"


def _shares(loop: StepLoop) -> TimeSummary:
    """The agent's share of each step (``agent_s`` / wall), summarised."""
    return TimeSummary.of([a / w for a, w in zip(loop.agent_s, loop.wall_s, strict=True)])


def _pct3(s: TimeSummary) -> str:
    return f"{s.min:.2%} / {s.median:.2%} / {s.max:.2%}"


def _act_split(loop: StepLoop) -> str:
    """``act`` times of the steps that took in a newly published policy and of the others."""
    parts = []
    for took, label in ((True, "loading a newly published policy"), (False, "acting from the policy it had")):
        times = [t for t, k in zip(loop.act_s, loop.took_policy, strict=True) if k == took]
        if times:
            parts.append(f"{label} {_ms3(TimeSummary.of(times), 2)} ms ({len(times)} steps)")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- part 1
def step_times(cfg: ExperimentConfig, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """Interleaved step times (wall and CPU) of every variant, plus the agent's time on rank 0, the
    learner's CPU time and the policy lag."""
    import torch

    torch.set_num_threads(args.threads)
    ray_init()
    loops: list[StepLoop] = []
    try:
        for name in VARIANTS:
            loops.append(StepLoop(name, cfg, device="cpu", agent_overrides=AGENT_OVERRIDES))
        for loop in loops:  # warm up: optimiser state, the learner's start and its first (slow) updates
            for _ in range(args.warmup):
                loop.step()
            loop.wait_for_learner()
            loop.clear_times()
        agents = [loop for loop in loops if loop.is_agent]
        load_before = format_load()
        learner_cpu = {loop.name: loop.learner_cpu_s() for loop in agents}
        interleave(loops, rounds=args.rounds, block=args.block)
        # the learner's work for the timed steps, including what it still had queued at the end
        catch_up = {}
        for loop in agents:
            start = time.perf_counter()
            loop.wait_for_learner()
            catch_up[loop.name] = time.perf_counter() - start
            learner_cpu[loop.name] = (loop.learner_cpu_s() - learner_cpu[loop.name]) / len(loop.wall_s)
        extra: dict[str, Any] = {"load": f"{load_before} -> {format_load()}", "agents": {}}
        for loop in agents:
            extra["agents"][loop.name] = {
                "summary": loop.agent_summary(),
                "act": TimeSummary.of(loop.act_s),
                "act_split": _act_split(loop),
                "observe_update": TimeSummary.of(
                    [a - b for a, b in zip(loop.agent_s, loop.act_s, strict=True)]
                ),
                "agent": TimeSummary.of(loop.agent_s),
                "share": _shares(loop),
                "learner_cpu": learner_cpu[loop.name],
                "catch_up": catch_up[loop.name],
            }
    finally:
        for loop in loops:
            loop.close()
        import ray

        ray.shutdown()
    by_name = {loop.name: loop for loop in loops}
    wall0 = statistics.median(loops[0].wall_s)
    cpu0 = statistics.median(loops[0].cpu_s)
    exact = by_name.get("exact")
    wall_exact = statistics.median(exact.wall_s) if exact is not None else float("nan")
    cpu_exact = statistics.median(exact.cpu_s) if exact is not None else float("nan")
    rows = []
    for loop in loops:
        w, c = TimeSummary.of(loop.wall_s), TimeSummary.of(loop.cpu_s)
        a = extra["agents"].get(loop.name)
        learner = a["learner_cpu"] if a else 0.0
        if a:
            a.update(
                wall_vs_exact=w.median / wall_exact,
                cpu_vs_exact=(c.median + learner) / cpu_exact,
                share_of_medians=a["agent"].median / w.median,
                wall=w,
            )
        rows.append(
            [
                VARIANT_LABELS[loop.name],
                _ms3(w),
                f"{w.median / wall0:.3f}",
                f"{w.median / wall_exact:.3f}" if a else DASH,
                _ms3(a["agent"], 2) if a else DASH,
                _pct3(a["share"]) if a else DASH,
                _ms3(c),
                f"{learner * 1e3:.1f}" if a else DASH,
                f"{(c.median + learner) / cpu0:.3f}",
                fmt_bytes(loop.probe_bytes),
                str(w.n),
            ]
        )
    return rows, extra


# --------------------------------------------------------------------------------------------- part 2
def slow_agent(cfg: ExperimentConfig, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """AC-ODM whose every step's update outlasts an LM step, taking turns with the probe-only loop."""
    import torch

    torch.set_num_threads(args.threads)
    ray_init()
    overrides = {**AGENT_OVERRIDES, "updates_per_step": float(args.slow_updates)}
    loops: list[StepLoop] = []
    learner_cpu = 0.0
    catch_up: list[float] = []
    try:
        loops.append(StepLoop("exact", cfg, device="cpu"))
        loops.append(StepLoop("ac_odm", cfg, device="cpu", agent_overrides=overrides))
        agent = loops[1]
        for loop in loops:
            for _ in range(args.warmup):
                loop.step()
            loop.wait_for_learner()
            loop.clear_times()
        load_before = format_load()
        for r in range(args.rounds):
            for loop in loops[r % 2 :] + loops[: r % 2]:
                before = loop.learner_cpu_s()
                for _ in range(args.block):
                    loop.step()
                if loop.is_agent:  # untimed: the next block starts with the learner caught up
                    start = time.perf_counter()
                    loop.wait_for_learner()
                    catch_up.append(time.perf_counter() - start)
                    learner_cpu += loop.learner_cpu_s() - before
        load = f"{load_before} -> {format_load()}"
        summary = agent.agent_summary()
    finally:
        for loop in loops:
            loop.close()
        import ray

        ray.shutdown()
    base_wall = statistics.median(loops[0].wall_s)
    rows = []
    for loop in loops:
        act, agent_t, wall = (
            TimeSummary.of(loop.act_s),
            TimeSummary.of(loop.agent_s),
            TimeSummary.of(loop.wall_s),
        )
        is_agent = loop.is_agent
        rows.append(
            [
                f"{VARIANT_LABELS[loop.name]}"
                + (f", updates_per_step {args.slow_updates}" if is_agent else ""),
                f"{act.median * 1e3:.2f} / {act.max * 1e3:.1f}" if is_agent else DASH,
                f"{agent_t.median * 1e3:.2f} / {agent_t.max * 1e3:.1f}" if is_agent else DASH,
                _pct3(_shares(loop)) if is_agent else DASH,
                f"{wall.median * 1e3:.0f} / {wall.max * 1e3:.0f}",
                f"{wall.median / base_wall:.3f}",
                f"{learner_cpu / wall.n * 1e3:.0f}" if is_agent else DASH,
                f"{statistics.median(catch_up):.1f} / {max(catch_up):.1f}" if is_agent else DASH,
                f"{summary['max_policy_lag']:.0f}" if is_agent else DASH,
                f"{summary['taken']:.0f}" if is_agent else DASH,
                str(wall.n),
            ]
        )
    agent_wall = statistics.median(loops[1].wall_s)
    return rows, {
        "load": load,
        "updates": args.slow_updates,
        "learner_per_wall": learner_cpu / len(loops[1].wall_s) / agent_wall,
        "num_updates": summary["num_updates"],
        "act_split": _act_split(loops[1]),
    }


# --------------------------------------------------------------------------------------------- part 3
def memory_child(args: argparse.Namespace) -> None:
    """Subprocess entry: build one variant, run steps, print its peak RSS as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = base_config(args)
    rss_start = rss_bytes()
    name = args.memory_child
    loop = None
    try:
        ray_init()  # every variant's process holds a Ray driver: the ratios isolate the probe and the agent
        loop = StepLoop(name, cfg, device="cpu", agent_overrides=AGENT_OVERRIDES)
        for _ in range(args.memory_steps):
            loop.step()
        out = {"variant": name, "peak_rss": peak_rss_bytes(), "rss_start": rss_start}
        if loop.is_agent:
            loop.wait_for_learner()
            out["learner_peak_rss"] = peak_rss_bytes(loop.learner_pid())
        print("MEMORY " + json.dumps(out), flush=True)
    finally:
        if loop is not None:
            loop.close()
        import ray

        ray.shutdown()


def memory(args: argparse.Namespace) -> list[list[str]]:
    """Run ``memory_child`` per variant in fresh processes (they inherit the allocator settings); rows
    of the memory table."""
    results = {}
    for name in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            name,
            "--memory-steps",
            str(args.memory_steps),
            "--threads",
            str(args.threads),
            "--config",
            str(args.config),
            *sum((["--set", s] for s in args.set), []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(
                f"memory subprocess for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        results[name] = json.loads(line[-1][len("MEMORY ") :])
    base = results["static"]["peak_rss"]
    rows = []
    for name in VARIANTS:
        r = results[name]
        rows.append(
            [
                VARIANT_LABELS[name],
                fmt_bytes(r["peak_rss"]),
                f"{r['peak_rss'] / base:.3f}",
                fmt_bytes(r["peak_rss"] - r["rss_start"]),
                fmt_bytes(r["learner_peak_rss"]) if "learner_peak_rss" in r else DASH,
            ]
        )
    return rows


# --------------------------------------------------------------------------------------------- part 4
def ledger_step_times(run_dir: Path) -> tuple[list[float], list[float]]:
    """Per loop iteration from a ledger: wall seconds, and wall seconds outside the Pretrainer's step.

    The first step and evaluation / checkpoint steps (and the step after them) are left out. The time
    outside ``time/step_s`` is the loop's own work (agent calls, observation and reward, ledger row): it
    shows what the Ray path adds even when machine load slows the LM compute itself.
    """
    import pandas as pd

    ledger = pd.read_parquet(run_dir / "ledger.parquet").sort_values("step")
    diffs = ledger["wall_time"].diff()
    evaluated = ledger["val/mean_ppl"].notna() if "val/mean_ppl" in ledger.columns else ledger["step"] < 0
    keep = ~evaluated & ~evaluated.shift(1, fill_value=False) & (ledger["step"] > 1) & diffs.notna()
    outside = diffs - ledger["time/step_s"]
    return diffs[keep].tolist(), outside[keep].tolist()


def train_overhead(args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """In-process and 1-worker Ray Train runs alternating (local, Ray, local, ...); rows and a summary."""
    import pandas as pd
    import ray

    from ray_jobs.driver import run_local
    from ray_jobs.train import run_train

    root = Path(tempfile.mkdtemp(prefix="overhead-", dir=REPO_ROOT / "runs" / "bench"))
    n = args.train_steps
    common_set = [
        f"train.total_steps={n}",
        f"eval.interval={n}",
        f"checkpoint.interval={n}",
        "agent.kind=uniform",
        f"lm.num_threads={args.threads}",
        "tracking.enabled=false",
        f"output_dir={root}",
        "ray.num_workers=1",
        f"ray.resources_per_worker={{CPU: {args.threads}}}",
        *args.set,
    ]
    runs = [
        (f"{'Ray Train, 1 worker' if i % 2 else 'in-process'} #{i // 2 + 1}", bool(i % 2))
        for i in range(2 * args.train_pairs + 1)
    ]
    medians: dict[bool, list[float]] = {False: [], True: []}
    outside_shares: dict[bool, list[float]] = {False: [], True: []}
    rows = []
    load_before = format_load()
    try:
        for i, (label, ray_enabled) in enumerate(runs):
            cfg = load_config(
                args.config, [*common_set, f"name=run{i}", f"ray.enabled={str(ray_enabled).lower()}"]
            )
            start = time.perf_counter()
            if ray_enabled:
                # A Ray of this process's own, started as `connect` would start it (which then reuses
                # it): `connect` itself would join any other Ray running on the machine.
                ray_init(include_dashboard=True, log_to_driver=True)
                try:
                    run_train(cfg)
                finally:
                    ray.shutdown()
            else:
                run_local(cfg)
            total = time.perf_counter() - start
            walls, outside = ledger_step_times(cfg.run_dir)
            s, o = TimeSummary.of(walls), TimeSummary.of(outside)
            medians[ray_enabled].append(s.median)
            outside_shares[ray_enabled].append(o.median / s.median)
            fixed = total - float(pd.read_parquet(cfg.run_dir / "ledger.parquet")["wall_time"].max())
            rows.append(
                [
                    label,
                    f"{s.min * 1e3:.0f} / {s.median * 1e3:.0f} / {s.max * 1e3:.0f}",
                    f"{o.median * 1e3:.1f}",
                    f"{o.median / s.median:.1%}",
                    f"{fixed:.1f}",
                    str(s.n),
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    local, remote = statistics.mean(medians[False]), statistics.mean(medians[True])
    spread = (max(medians[False]) - min(medians[False])) / local
    extra_share = statistics.mean(outside_shares[True]) - statistics.mean(outside_shares[False])
    return rows, {
        "ratio": remote / local,
        "local_spread": spread,
        "extra_share": extra_share,
        "load": f"{load_before} -> {format_load()}",
    }


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the LM (default 1)")
    p.add_argument(
        "--warmup",
        type=int,
        default=8,
        help="untimed steps per variant first (the agent's first updates are slow; default 8)",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="rounds of the step-time and slow-agent parts (default 4)"
    )
    p.add_argument("--block", type=int, default=4, help="steps per variant per round (default 4)")
    p.add_argument("--memory-steps", type=int, default=6, help="steps per memory subprocess (default 6)")
    p.add_argument(
        "--train-steps", type=int, default=40, help="steps per in-process / Ray Train run (default 40)"
    )
    p.add_argument(
        "--train-pairs",
        type=int,
        default=2,
        help="Ray Train runs, each between two in-process runs (default 2)",
    )
    p.add_argument(
        "--slow-updates", type=int, default=200, help="updates_per_step of the slow-agent part (default 200)"
    )
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["steps", "slow", "memory", "train"], help="parts to skip"
    )
    p.add_argument(
        "--results", type=Path, default=None, help="append the printed section to this file (e.g. RESULTS.md)"
    )
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    flags = ("threads", "rounds", "block", "memory_steps", "train_steps", "train_pairs", "slow_updates")
    for flag in flags:
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def render(args: argparse.Namespace, parts: dict[str, Any], header: dict[str, str]) -> str:
    """The printed report / RESULTS.md section."""
    config = args.config.resolve()
    config_text = config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config
    out = [
        "## Overhead of AC-ODM on the tiny CPU LM (benchmarks/overhead.py)",
        f"- Command: `{header['command']}` (base config `{config_text}`)",
        f"- Date: {header['date']}; machine: {header['machine']}; revision {header['revision']}",
        f"- Allocator settings of every process that trains (this one, its subprocesses, Ray's workers): "
        f"{header['allocator']}",
        f"- Warm-up {args.warmup} untimed steps per loop; {args.rounds} rounds of {args.block} steps per "
        f"variant; total wall time {header['wall_s']:.0f} s",
        "",
    ]
    if "steps" in parts:
        rows, extra = parts["steps"]
        out += [
            f"Step time, variants interleaved in one process ({extra['load']}):",
            "",
            markdown_table(
                [
                    "variant",
                    "wall ms min / median / max",
                    "wall median / static",
                    "wall median / exact (probe only)",
                    "agent on rank 0 ms min / median / max",
                    "agent share of step min / median / max",
                    "trainer CPU ms min / median / max",
                    "learner actor CPU ms per step",
                    "CPU (trainer + learner) / static",
                    "probe state",
                    "steps",
                ],
                rows,
            ),
            "",
            "- Agent on rank 0 = the step's `act` + `Transition` + `observe` + `update` calls (what the run "
            "loop records as `time/agent_s`); its share is `agent_s` / wall of the same step (min / median "
            "/ max over the steps). Wall / exact is what the agent adds on top of the probe, but on a shared "
            "machine load moves step times by more than the agent's share; the rank-0 share is the "
            "steadier measure (target: under 1%).",
        ]
        for name, a in extra["agents"].items():
            s = a["summary"]
            out.append(
                f"- {VARIANT_LABELS[name]}: the agent took {_ms3(a['agent'], 2)} ms (min / median / max) of "
                f"rank 0's step, {_pct3(a['share'])} of it per step ({a['share_of_medians']:.2%} as median "
                f"agent time / median wall); `act` {_ms3(a['act'], 2)} ms ({a['act_split']}), "
                f"`Transition` + `observe` + `update` {_ms3(a['observe_update'], 2)} ms. The wall median is {a['wall_vs_exact']:.3f}x "
                f"the probe-only loop's ({a['cpu_vs_exact']:.3f}x in CPU, trainer + learner). The learner "
                f"used {a['learner_cpu'] * 1e3:.1f} ms of CPU per step in its own process; rank 0 took in "
                f"{s['taken']:.0f} of its updates over {a['wall'].n} steps, with a policy lag of at most "
                f"{s['max_policy_lag']:.0f} transition(s) (learner restarts: {s['restarts']:.0f}); waiting "
                f"for it to take the last transition after the timed steps took {a['catch_up'] * 1e3:.0f} ms."
            )
        out.append("")
    if "slow" in parts:
        rows, extra = parts["slow"]
        out += [
            f"An agent slower than the LM: AC-ODM with updates_per_step = {extra['updates']}, taking turns "
            f"in blocks with the probe-only loop; after each AC-ODM block the script waits (untimed) for the "
            f"learner to catch up ({extra['load']}):",
            "",
            markdown_table(
                [
                    "loop",
                    "act ms median / max",
                    "agent on rank 0 ms median / max",
                    "agent share of step min / median / max",
                    "step wall ms median / max",
                    "step wall / exact",
                    "learner CPU ms per step",
                    "learner catch-up after a block s median / max",
                    "max policy lag",
                    "updates taken in",
                    "steps",
                ],
                rows,
            ),
            "",
            f"- The learner's CPU time per step was {extra['learner_per_wall']:.2f}x the AC-ODM loop's "
            f"median step wall time ({extra['num_updates']:.0f} gradient updates done by the newest update "
            f"taken in): "
            + (
                "each step's update outlasts an LM step."
                if extra["learner_per_wall"] > 1
                else "each step's update did NOT outlast an LM step here (raise --slow-updates)."
            )
            + f" `act` by kind: {extra['act_split']}. `act` does not wait for an update (a non-blocking "
            f"`ray.wait`, then a forward pass of the local copy); the policy it acts from lags instead "
            f"(`agent/policy_lag`: transitions submitted that the acting policy had not learned from when an "
            f"update was taken in).",
            "",
        ]
    if "memory" in parts:
        out += [
            "Peak memory, one fresh process per variant, each with a Ray driver (Linux VmHWM):",
            "",
            markdown_table(
                [
                    "variant",
                    "peak RSS",
                    "ratio to static",
                    "growth over start-up RSS",
                    "learner actor peak RSS",
                ],
                parts["memory"],
            ),
            "",
        ]
    if "train" in parts:
        rows, summary = parts["train"]
        out += [
            f"In-process loop vs Ray Train with one worker, static uniform mixture, runs alternating "
            f"({summary['load']}):",
            "",
            markdown_table(
                [
                    "run",
                    "wall ms per step min / median / max",
                    "outside the Pretrainer step, ms (median)",
                    "outside / step",
                    "fixed start-up + tear-down s",
                    "steps timed",
                ],
                rows,
            ),
            "",
            f"- Ray Train / in-process (mean of the runs' median step times): {summary['ratio']:.3f}; the "
            f"in-process runs differ from each other by {summary['local_spread']:.1%} of their mean, so a "
            f"difference below that is noise.",
            f"- The loop's own work outside the Pretrainer step (mixer calls, weight broadcast, observation, "
            f"reward, ledger) takes {summary['extra_share']:+.1%} more of each step under Ray Train than "
            f"in-process (mean over runs of the median share): the part of the overhead that load does not "
            f"blur (it scales with the step). The Pretrainer step runs the same code on both paths: the "
            f"in-process runs' spread shows how much its time drifts on this machine.",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the parts, print the tables, optionally append them to a results file."""
    args = parse_args(argv)
    # this process runs the loops: the allocator settings every training process has (re-exec if missing)
    run_with_allocator_env(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    start = time.perf_counter()
    header = {
        "command": command_line(),
        "date": utc_now(),
        "machine": machine_summary(),
        "revision": git_revision(),
        "allocator": allocator_summary(),
    }
    cfg = base_config(args)
    parts: dict[str, Any] = {}
    if "steps" not in args.skip:
        log.info("part 1: interleaved step times (%s)", format_load())
        parts["steps"] = step_times(cfg, args)
    if "slow" not in args.skip:
        log.info("part 2: an agent slower than the LM (%s)", format_load())
        parts["slow"] = slow_agent(cfg, args)
    if "memory" not in args.skip:
        log.info("part 3: peak memory per variant (%s)", format_load())
        parts["memory"] = memory(args)
    if "train" not in args.skip:
        log.info("part 4: in-process vs Ray Train (%s)", format_load())
        parts["train"] = train_overhead(args)
    header["wall_s"] = time.perf_counter() - start
    text = render(args, parts, header)
    print(text)
    if args.results is not None:
        append_section(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
