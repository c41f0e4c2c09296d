"""Overhead of AC-ODM's machinery on the tiny CPU LM, measured in one run against a static mixture.

Five parts, all on the base config ``configs/bench-demo.yaml`` (the demo corpus, the tiny GPT-NeoX,
one torch thread, 8 micro-batches of 2 x 64 tokens per optimiser step):

1. **Step time** of one loop iteration in five variants (``benchmarks.common.StepLoop``):
   ``static``, a static mixture with no probe (the Pretrainer alone); ``exact`` and ``sketch``, the
   probe in that mode (env step with hooks, Gram matrix, observation and reward; static mixer);
   ``ac_odm``, AC-ODM as ``acodm train`` runs it by default (probe exact; the agent learns in a Ray
   actor and rank 0 acts from its own copy of the policy the actor publishes, ``LocalActingMixer``:
   ``act`` is a local forward pass, ``observe`` submits ``AgentActor.learn`` without waiting,
   ``ray.agent_acting: local``, ``ray.agent_async: true``); and ``ac_odm_actor``, the old path
   (``ray.agent_acting: actor``, ``RemoteMixer``: every ``act`` is an actor round trip, updates run
   in the actor's background thread). All five live in this process and take turns in blocks of
   steps, the order rotating every round, so machine load hits them alike. Reported: min / median /
   max wall ms per step and the ratio of medians to the static variant and, for AC-ODM, to ``exact``
   (what the agent adds on top of the probe); the agent's time on rank 0 per step (``act`` +
   ``observe`` + ``update``, the run loop's ``time/agent_s``) and its share of the step (the steady
   measure on a loaded machine); this process's CPU time and the agent actor's CPU time per step;
   each AC-ODM loop's ``act`` time, updates, policy lag and pending updates.
2. **Agent calls on rank 0**, taking turns ``--act-repeats`` times: ``act`` on the actor (the
   ``ac_odm_actor`` loop, queue drained first) and a no-op actor call; with local acting (a separate
   ``LocalActingMixer`` loaded with the ``ac_odm`` loop's agent, so that loop is left alone):
   ``observe`` (submitting ``learn``) and, once the reply thread has taken the new policy in, ``act``;
   and ``act`` of the whole mixer in-process, in ms.
3. **Peak memory** of each variant in a fresh subprocess (peak RSS, Linux ``VmHWM``), and for AC-ODM
   the actor process's peak RSS too (Ray's own daemons are not counted).
4. **In-process loop vs 1-worker Ray Train** (``run_local`` then ``run_train`` then ``run_local`` again,
   same config, static uniform mixer): median wall seconds per step from the ledgers' ``wall_time``
   (evaluation and checkpoint steps excluded), and the ratio of Ray Train to the mean of the two
   in-process runs; Ray Train's fixed start-up and tear-down time is reported apart.
5. **An agent slower than the LM** (``slow`` part): AC-ODM with ``updates_per_step`` raised
   (``--slow-updates``, default 200) so one update takes longer than an LM step, in up to four modes
   (``--slow-modes``): local acting asynchronous (the default: ``act`` applies the replies already
   back and never waits) and ordered (``ray.agent_async: false``: ``act`` waits for step t-1's
   reply), the actor path overlapped (``act`` answers from the published policy) and ordered (``act``
   waits for the update in flight). The loops take turns in blocks; each block starts from a drained
   agent (the drain is not timed). Reported: ``act`` and the agent's rank-0 time in the loop and the
   step's wall time, median and max, the actor's update time per step and the largest policy lag:
   asynchronous, ``act`` must stay at its local / round-trip cost whatever the update costs.

The machine this runs on is shared; the load average is printed with the numbers.

Usage: ``.venv/bin/python benchmarks/overhead.py [--rounds 4] [--block 4] [--train-steps 40]
[--slow-modes local-async local-ordered actor-async actor-ordered] [--results benchmarks/RESULTS.md]``
(about 6-7 minutes on 2 idle cores; ``--skip memory train slow`` for parts 1-2; smoke test:
``--rounds 1 --block 2 --warmup 2 --act-repeats 5 --slow-updates 20 --skip memory train``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    VARIANT_LABELS,
    VARIANTS,
    StepLoop,
    TimeSummary,
    append_section,
    command_line,
    fmt_bytes,
    format_load,
    git_revision,
    interleave,
    machine_summary,
    markdown_table,
    peak_rss_bytes,
    rss_bytes,
    utc_now,
)

from ray_jobs.config import ExperimentConfig, load_config

log = logging.getLogger("overhead")

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench-demo.yaml"
# The steady state of AC-ODM: no ODM warmup, so every decision is the actor's and every step updates.
AGENT_OVERRIDES = {"warmup_fraction": 0.0}


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


def ray_init(num_cpus: int | None = None) -> None:
    """A local Ray for the agent actor (no dashboard: it is not part of what is measured)."""
    import ray

    from ray_jobs.cluster import local_system_config

    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
        _system_config=local_system_config() or None,  # workers at niceness 0, as `acodm train` starts them
    )


# --------------------------------------------------------------------------------------------- part 1 and 2
def step_times(cfg: ExperimentConfig, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """Interleaved step times (wall and CPU) of every variant, plus each agent variant's agent time,
    round trips and counters."""
    import torch

    torch.set_num_threads(args.threads)
    ray_init()
    loops: list[StepLoop] = []
    try:
        for name in VARIANTS:
            loops.append(StepLoop(name, cfg, device="cpu", agent_overrides=AGENT_OVERRIDES))
        for loop in loops:  # warm up: optimiser state, the actor's start and its first (slow) updates
            for _ in range(args.warmup):
                loop.step()
            loop.clear_times()
        agents = {loop.name: loop for loop in loops if loop.is_agent}
        load_before = format_load()
        actor_cpu = {name: loop.actor_cpu_s() for name, loop in agents.items()}
        interleave(loops, rounds=args.rounds, block=args.block)
        for name, loop in agents.items():
            actor_cpu[name] = (loop.actor_cpu_s() - actor_cpu[name]) / (args.rounds * args.block)
        extra = {
            "load": f"{load_before} -> {format_load()}",
            "agents": {
                name: {
                    "stats": loop.agent_stats(),
                    "act": TimeSummary.of(loop.act_s),
                    "agent": TimeSummary.of(loop.agent_s),
                    "actor_cpu": actor_cpu[name],
                }
                for name, loop in agents.items()
            },
            "round_trip": round_trips(agents, args.act_repeats),
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
        agent_cpu = extra["agents"][loop.name]["actor_cpu"] if loop.is_agent else 0.0
        agent_s = statistics.median(loop.agent_s)
        if loop.is_agent:
            extra["agents"][loop.name].update(
                wall_vs_exact=w.median / wall_exact,
                cpu_vs_exact=(c.median + agent_cpu) / cpu_exact,
                agent_share=agent_s / w.median,
            )
        rows.append(
            [
                VARIANT_LABELS[loop.name],
                f"{w.min * 1e3:.0f} / {w.median * 1e3:.0f} / {w.max * 1e3:.0f}",
                f"{w.median / wall0:.3f}",
                f"{w.median / wall_exact:.3f}" if loop.is_agent else "\u2014",
                f"{agent_s * 1e3:.2f}" if loop.is_agent else "\u2014",
                f"{agent_s / w.median:.2%}" if loop.is_agent else "\u2014",
                f"{c.min * 1e3:.0f} / {c.median * 1e3:.0f} / {c.max * 1e3:.0f}",
                f"{agent_cpu * 1e3:.1f}" if loop.is_agent else "\u2014",
                f"{(c.median + agent_cpu) / cpu0:.3f}",
                fmt_bytes(loop.probe_bytes),
                str(w.n),
            ]
        )
    return rows, extra


def _timed(call: Callable[[], Any]) -> float:
    """Wall seconds of one ``call()``."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def round_trips(agents: Mapping[str, StepLoop], repeats: int) -> tuple[dict[str, TimeSummary], str]:
    """What one step's agent calls cost on rank 0, each ``repeats`` times, taking turns.

    * the actor path (the ``ac_odm_actor`` loop's ``RemoteMixer``, its queue drained first): ``act``
      over the actor, and a no-op actor call (``stats``) for the bare Ray round trip;
    * local acting (a separate ``LocalActingMixer`` from the ``ac_odm`` loop's spec, loaded with that
      loop's agent state and fed its last transition again and again, so the loop's own mixer is left
      alone): ``observe`` (the copy's bookkeeping + submitting ``AgentActor.learn``), then, once the
      reply is back and its policy taken in by the reply thread (untimed; in a run the LM step covers
      this), ``act`` (the copy's forward pass and bookkeeping);
    * ``act`` of the whole mixer in this process (no actor at all), for scale.

    Returns:
        The timings by call, and a note on what the local ``act`` includes.
    """
    import ray

    from agents import build_mixer
    from ray_jobs.agent_actor import LocalActingMixer

    timed: dict[str, list[float]] = {}
    per_repeat: list[Callable[[], dict[str, float]]] = []
    actor_loop, local_loop = agents.get("ac_odm_actor"), agents.get("ac_odm")
    source = local_loop if local_loop is not None else actor_loop
    if source is None:
        return {}, ""
    created: list[Any] = []
    try:
        if actor_loop is not None:
            remote, actor_obs = actor_loop.mixer, actor_loop.obs
            remote.drain()

            def actor_calls() -> dict[str, float]:
                return {
                    "actor act": _timed(lambda: remote.act(actor_obs, explore=True)),
                    "actor no-op call": _timed(lambda: ray.get(remote.handle.stats.remote())),
                }

            per_repeat.append(actor_calls)
        if local_loop is not None and local_loop.last_transition is not None:
            split = LocalActingMixer(local_loop.mixer.spec, asynchronous=local_loop.mixer.asynchronous)
            created.append(split)
            split.load_state_dict(local_loop.mixer.state_dict())
            obs, weights, reward, next_obs, info = local_loop.last_transition
            last = {"weights": weights}

            def local_calls() -> dict[str, float]:
                out = {
                    "local observe (submit learn)": _timed(
                        lambda: split.observe(obs, last["weights"], reward, next_obs, info)
                    )
                }
                # untimed (the LM step, in a run): the reply comes back and, in the asynchronous mode,
                # the reply thread loads the new policy (ordered mode: the next act waits for it)
                if split.asynchronous:
                    split.drain()
                else:
                    ray.get(split.handle.stats.remote())
                out["local act"] = _timed(lambda: last.__setitem__("weights", split.act(obs, explore=True)))
                return out

            per_repeat.append(local_calls)
        state = source.mixer.state_dict()
        spec = source.mixer.spec
        whole = build_mixer(
            spec.agent_cfg, source.env.observation_space, source.env.action_space, **dict(spec.mixer_kwargs)
        )
        whole.load_state_dict(state)
        per_repeat.append(lambda: {"in-process act": _timed(lambda: whole.act(source.obs, explore=True))})
        for _ in range(repeats):
            for calls in per_repeat:
                for name, seconds in calls().items():
                    timed.setdefault(name, []).append(seconds)
    finally:
        for mixer in created:
            with contextlib.suppress(Exception):
                mixer.drain()
            mixer.close()
    note = ""
    if local_loop is not None:
        note = (
            "Local act: the copy's forward pass and bookkeeping, the reply's policy already taken in by the "
            "reply thread (asynchronous mode) while the LM step ran"
        )
    return {name: TimeSummary.of(t) for name, t in timed.items()}, note


# --------------------------------------------------------------------------------------------- part 5
# The slow-agent modes: key -> (label, agent_acting, agent_async). The first is the default and the
# baseline of the table's ratio.
SLOW_MODES = {
    "local-async": ("local acting, async (agent_async: true; the default)", "local", True),
    "local-ordered": ("local acting, ordered (agent_async: false)", "local", False),
    "actor-async": ("actor answers act, overlapped (agent_acting: actor)", "actor", True),
    "actor-ordered": ("actor answers act, ordered (agent_acting: actor, agent_async: false)", "actor", False),
}


def slow_agent(cfg: ExperimentConfig, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """Local acting and the actor path, each asynchronous and ordered, when one agent update outlasts an
    LM step."""
    import torch

    torch.set_num_threads(args.threads)
    ray_init()
    overrides = {**AGENT_OVERRIDES, "updates_per_step": float(args.slow_updates)}
    modes = {key: SLOW_MODES[key] for key in args.slow_modes}
    loops: dict[str, StepLoop] = {}
    lags = dict.fromkeys(modes, 0.0)
    update_s = dict.fromkeys(modes, 0.0)
    try:
        for key, (_, acting, overlap) in modes.items():
            loops[key] = StepLoop(
                "ac_odm",
                cfg,
                device="cpu",
                agent_overrides=overrides,
                overlap_act=overlap,
                agent_acting=acting,
            )
        for loop in loops.values():
            for _ in range(args.warmup):
                loop.step()
            loop.mixer.drain()
            loop.clear_times()
        load_before = format_load()
        items = list(loops.items())
        for r in range(args.rounds):
            order = items[r % len(items) :] + items[: r % len(items)]
            for key, loop in order:
                before = loop.agent_stats()["update_s"]
                for _ in range(args.block):
                    loop.step()
                loop.mixer.drain()  # untimed: the next block starts from an empty queue
                stats = loop.agent_stats()
                update_s[key] += stats["update_s"] - before
                lags[key] = max(lags[key], stats["max_policy_lag"])
        load = f"{load_before} -> {format_load()}"
    finally:
        for loop in loops.values():
            loop.close()
        import ray

        ray.shutdown()
    rows = []
    base_wall = statistics.median(next(iter(loops.values())).wall_s)
    for key, loop in loops.items():
        act, agent = TimeSummary.of(loop.act_s), TimeSummary.of(loop.agent_s)
        wall = TimeSummary.of(loop.wall_s)
        rows.append(
            [
                modes[key][0],
                f"{act.median * 1e3:.2f} / {act.max * 1e3:.1f}",
                f"{agent.median * 1e3:.2f} / {agent.max * 1e3:.1f}",
                f"{wall.median * 1e3:.0f} / {wall.max * 1e3:.0f}",
                f"{wall.median / base_wall:.3f}",
                f"{update_s[key] / wall.n * 1e3:.0f}",
                f"{lags[key]:.0f}",
                str(wall.n),
            ]
        )
    return rows, {"load": load, "updates": args.slow_updates, "baseline": modes[next(iter(modes))][0]}


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
            loop.mixer.drain()
            out["actor_peak_rss"] = peak_rss_bytes(loop.actor_pid())
        print("MEMORY " + json.dumps(out), flush=True)
    finally:
        if loop is not None:
            loop.close()
        import ray

        ray.shutdown()


def memory(args: argparse.Namespace) -> list[list[str]]:
    """Run ``memory_child`` per variant in fresh processes; rows of the memory table."""
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
        actor = fmt_bytes(r["actor_peak_rss"]) if "actor_peak_rss" in r else "\u2014"
        rows.append(
            [
                VARIANT_LABELS[name],
                fmt_bytes(r["peak_rss"]),
                f"{r['peak_rss'] / base:.3f}",
                fmt_bytes(r["peak_rss"] - r["rss_start"]),
                actor,
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
            (run_train if ray_enabled else run_local)(cfg)
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
        help="untimed steps per variant first (the agent's first updates are slow)",
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds of the step-time comparison")
    p.add_argument("--block", type=int, default=4, help="steps per variant per round")
    p.add_argument("--act-repeats", type=int, default=100, help="agent round trips timed")
    p.add_argument("--memory-steps", type=int, default=6, help="steps per memory subprocess")
    p.add_argument("--train-steps", type=int, default=40, help="steps per in-process / Ray Train run")
    p.add_argument(
        "--train-pairs", type=int, default=2, help="Ray Train runs (each between two in-process runs)"
    )
    p.add_argument(
        "--slow-updates", type=int, default=200, help="updates_per_step of the slow-agent part (default 200)"
    )
    p.add_argument(
        "--slow-modes",
        nargs="+",
        default=list(SLOW_MODES),
        choices=list(SLOW_MODES),
        help="agent modes of the slow-agent part, in this order (default: all four; the first is the "
        "ratio's baseline)",
    )
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["steps", "memory", "train", "slow"], help="parts to skip"
    )
    p.add_argument(
        "--results", type=Path, default=None, help="append a section to this file (e.g. RESULTS.md)"
    )
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    flags = (
        "threads",
        "rounds",
        "block",
        "act_repeats",
        "memory_steps",
        "train_steps",
        "train_pairs",
        "slow_updates",
    )
    for flag in flags:
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.slow_modes = list(dict.fromkeys(args.slow_modes))
    return args


def render(args: argparse.Namespace, parts: dict[str, Any], header: dict[str, str]) -> str:
    """The printed report / RESULTS.md section."""
    config = args.config.resolve()
    config_text = config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config
    out = [
        "## Overhead of AC-ODM on the tiny CPU LM (benchmarks/overhead.py)",
        f"- Command: `{header['command']}` (base config `{config_text}`)",
        f"- Date: {header['date']}; machine: {header['machine']}; revision {header['revision']}",
        f"- Total wall time {header['wall_s']:.0f} s",
        "",
    ]
    if "steps" in parts:
        rows, extra = parts["steps"]
        rt = extra["round_trip"]
        out += [
            f"Step time, variants interleaved in one process ({extra['load']}):",
            "",
            markdown_table(
                [
                    "variant",
                    "wall ms min / median / max",
                    "wall median / static",
                    "wall median / exact (probe only)",
                    "agent on rank 0 ms (median)",
                    "agent share of step",
                    "trainer CPU ms min / median / max",
                    "agent actor CPU ms per step",
                    "CPU (trainer + actor) / static",
                    "probe state",
                    "steps",
                ],
                rows,
            ),
            "",
            "- Agent on rank 0 = the step's `act` + `observe` + `update` calls (what the run loop records "
            "as `time/agent_s`); its share is median agent time / median wall. Wall / exact is what the "
            "agent adds on top of the probe (the target: under 1%), but on a shared machine load can move "
            "step times by more than the agent's few ms; the rank-0 share is the steadier measure.",
        ]
        for name, a in extra["agents"].items():
            stats = a["stats"]
            per_update = stats.get("update_s", 0.0) / max(stats.get("updates_done", 0.0), 1.0)
            if stats.get("local_acting"):  # the actor learns inline: nothing pends there
                behind = f"{stats.get('policy_lag', 0):.0f} transitions not yet in the acting copy at the end"
            else:
                behind = f"{stats.get('pending', 0):.0f} updates pending in the actor at the end"
            out.append(
                f"- {VARIANT_LABELS[name]}: adds {a['wall_vs_exact'] - 1:+.1%} wall "
                f"({a['cpu_vs_exact'] - 1:+.1%} CPU, trainer + actor) to the probe-only step; the agent "
                f"took {a['agent'].median * 1e3:.2f} ms median ({a['agent'].max * 1e3:.1f} ms max) of rank "
                f"0's step = {a['agent_share']:.2%}, of which `act` {a['act'].median * 1e3:.2f} ms median "
                f"({a['act'].max * 1e3:.1f} ms max); the actor ran {stats.get('updates_done', 0):.0f} "
                f"updates for {stats.get('observed', 0):.0f} transitions ({per_update * 1e3:.1f} ms wall "
                f"each on average, warm-up included); the policy acting lagged by at most "
                f"{stats.get('max_policy_lag', 0):.0f} transition(s); {behind}."
            )
        timings, notes = rt
        if timings:
            out.append(
                f"- Agent calls on rank 0 (ms, min / median / max over {args.act_repeats} turns): "
                + "; ".join(
                    f"{name} {s.min * 1e3:.3f} / {s.median * 1e3:.3f} / {s.max * 1e3:.3f} (n={s.n})"
                    for name, s in timings.items()
                )
                + (f". {notes}" if notes else "")
            )
        out.append("")
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
                    "agent actor peak RSS",
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
            f"- The loop's own work outside the Pretrainer step (agent actor round trips, weight broadcast, "
            f"observation, reward, ledger) takes {summary['extra_share']:+.1%} more of each step under Ray "
            f"Train than in-process (mean over runs of the median share): the part of the overhead that load "
            f"does not blur (it scales with the step). The Pretrainer step runs the same code on both "
            f"paths: the in-process runs' spread shows how much its time drifts on this machine.",
            "",
        ]
    if "slow" in parts:
        rows, extra = parts["slow"]
        out += [
            f"An agent slower than the LM: AC-ODM with updates_per_step = {extra['updates']}, the modes "
            f"taking turns in blocks that each start from a drained agent ({extra['load']}):",
            "",
            markdown_table(
                [
                    "agent mode",
                    "act in the loop ms median / max",
                    "agent on rank 0 ms median / max",
                    "step wall ms median / max",
                    "step wall / first row",
                    "agent actor update ms per step",
                    "max policy lag",
                    "steps",
                ],
                rows,
            ),
            "",
            "- Agent on rank 0 = `act` + `observe` + `update` per step (`time/agent_s`). Expected: "
            "asynchronous, `act` stays at its local (or round-trip) cost whatever an update costs; "
            "ordered, `act` waits for the update of step t-1.",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the parts, print the tables, optionally append them to RESULTS.md."""
    args = parse_args(argv)
    from ray_jobs.driver import configure_malloc

    configure_malloc()  # this process runs the loops: the malloc settings every training process has
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
    }
    cfg = base_config(args)
    parts: dict[str, Any] = {}
    if "steps" not in args.skip:
        log.info("part 1-2: interleaved step times and agent round trips (%s)", format_load())
        parts["steps"] = step_times(cfg, args)
    if "slow" not in args.skip:
        log.info("part 5: an agent slower than the LM, %s (%s)", " / ".join(args.slow_modes), format_load())
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
