"""Where AC-ODM should act under Ray, at any network size: rank 0 from a copy of the published policy
(``ray.agent_acting: local``, ``LocalActingMixer``) or the agent actor answering every ``act``
(``ray.agent_acting: actor``, ``RemoteMixer``).

``benchmarks/overhead.py`` measures both on the tiny demo networks (128 wide, 2 layers); this script
measures them at a chosen size, by default the reference's (K=22 domains, 1024 x 5 networks: a 16 MiB
actor network, so each update ships a 16 MiB snapshot to rank 0). No LM is built: each step is a
synthetic one, torch matmuls on the caller's thread for ``--step-s`` seconds (they release the GIL, as
an LM step's kernels do), followed by the agent's calls as the run loop makes them (``act``, then
``observe`` and ``update``). The two placements run one after the other, each with its own actor;
the first ``--warmup`` steps (actor start-up) are not timed.

Reported per placement: the agent's wall time on the caller per step (what the run loop records as
``time/agent_s``) as median / p90 / max and its share of the step, the largest policy lag, and the
snapshot size.

Usage: ``.venv/bin/python benchmarks/agent_placement.py [--domains 22] [--width 1024] [--layers 5]
[--step-s 0.5] [--steps 40] [--results benchmarks/RESULTS.md]`` (about 1 minute with the defaults).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from common import (
    TimeSummary,
    append_section,
    command_line,
    format_load,
    git_revision,
    machine_summary,
    markdown_table,
    utc_now,
)

log = logging.getLogger("agent_placement")

PLACEMENTS = {
    "local": "rank 0 acts from the published policy (agent_acting: local)",
    "actor": "the actor answers act (agent_acting: actor)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (sizes, step length, steps, where to append the results)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=22, help="K (default: 22, The Pile's)")
    parser.add_argument("--lm-layers", type=int, default=12, help="LM layers, which set the observation size")
    parser.add_argument("--width", type=int, default=1024, help="agent.hidden_width")
    parser.add_argument("--layers", type=int, default=5, help="agent.num_hidden_layers")
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds of synthetic LM work per step")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per placement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (actor start-up)")
    parser.add_argument("--results", default=None, help="append a section to this Markdown file")
    args = parser.parse_args(argv)
    for name in ("domains", "width", "layers", "steps", "lm_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.step_s <= 0 or args.warmup < 0:
        parser.error("--step-s must be > 0 and --warmup >= 0")
    return args


def synthetic_step(seconds: float, work: Any) -> Any:
    """Torch matmuls on this thread for ``seconds`` (the stand-in for an LM step)."""
    import torch

    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        work = torch.tanh(work @ work * 1e-3)
    return work


def run_placement(placement: str, args: argparse.Namespace) -> dict[str, Any]:
    """One placement's loop; its agent times, policy lag and snapshot size."""
    import numpy as np
    import torch
    from gymnasium import spaces

    from agents.config import AgentConfig
    from envs.observation import observation_size
    from ray_jobs.agent_actor import AgentActorSpec, LocalActingMixer, RemoteMixer

    k, s = args.domains, observation_size(args.domains, args.lm_layers)
    obs_space = spaces.Box(-np.inf, np.inf, (s,), np.float32)
    act_space = spaces.Box(0.0, 1.0, (k,), np.float32)
    cfg = AgentConfig(kind="ac_odm", hidden_width=args.width, num_hidden_layers=args.layers, warmup_fraction=0.0)
    kwargs = {
        "seed": 0,
        "domain_names": [f"d{i}" for i in range(k)],
        "total_steps": args.warmup + args.steps + 1,
        "floor": 0.1 / k,
    }
    spec = AgentActorSpec(cfg, obs_space, act_space, mixer_kwargs=kwargs, num_threads=1)
    mixer = LocalActingMixer(spec) if placement == "local" else RemoteMixer(spec)
    rng = np.random.default_rng(0)
    work = torch.randn(256, 256)
    obs = rng.normal(size=s).astype(np.float32)
    agent_s: list[float] = []
    try:
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            weights = mixer.act(obs, explore=True)
            spent = time.perf_counter() - start
            work = synthetic_step(args.step_s, work)
            next_obs = rng.normal(size=s).astype(np.float32)
            info = {"weights_K": weights, "reward_parts_K": rng.normal(size=k), "loss_K": rng.uniform(2, 4, k)}
            start = time.perf_counter()
            mixer.observe(obs, weights, 0.0, next_obs, info)
            mixer.update()
            spent += time.perf_counter() - start
            if i >= args.warmup:
                agent_s.append(spent)
            obs = next_obs
        stats = mixer.stats()
        snapshot_bytes = 0
        if placement == "local":
            snapshot = mixer.replica.policy_snapshot()
            snapshot_bytes = sum(a.nbytes for a in snapshot["actor"].values())
    finally:
        mixer.close()
    p90 = sorted(agent_s)[min(len(agent_s) - 1, int(0.9 * len(agent_s)))]
    return {"agent": TimeSummary.of(agent_s), "p90": p90, "lag": stats["max_policy_lag"], "snapshot": snapshot_bytes}


def main(argv: list[str] | None = None) -> int:
    """Run both placements, print the table, append it to ``--results`` if given."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import ray
    import torch

    from ray_jobs.cluster import local_system_config

    torch.set_num_threads(1)
    load_before = format_load()
    ray.init(num_cpus=2, include_dashboard=False, _system_config=local_system_config(), logging_level="ERROR")
    try:
        results = {}
        for placement in PLACEMENTS:
            log.info("%s (%s)", PLACEMENTS[placement], format_load())
            results[placement] = run_placement(placement, args)
    finally:
        ray.shutdown()
    rows = []
    for placement, r in results.items():
        a = r["agent"]
        rows.append(
            [
                PLACEMENTS[placement],
                f"{a.median * 1e3:.2f} / {r['p90'] * 1e3:.2f} / {a.max * 1e3:.2f}",
                f"{a.median / args.step_s:.2%}",
                f"{r['lag']:.0f}",
                f"{r['snapshot'] / 2**20:.1f} MiB" if r["snapshot"] else "\u2014",
                str(a.n),
            ]
        )
    table = markdown_table(
        ["placement", "agent on the caller per step, ms median / p90 / max", "share of a step",
         "max policy lag", "snapshot per update", "steps"],
        rows,
    )
    text = "\n".join(
        [
            f"## Agent placement at K={args.domains}, {args.width}x{args.layers} networks "
            "(benchmarks/agent_placement.py)",
            f"- Command: `{command_line()}`",
            f"- Date: {utc_now()}; machine: {machine_summary()}; revision {git_revision()}",
            f"- Synthetic LM step: {args.step_s} s of torch matmuls on the caller's thread; "
            f"{load_before} -> {format_load()}",
            "",
            table,
        ]
    )
    print(text)
    if args.results:
        append_section(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
