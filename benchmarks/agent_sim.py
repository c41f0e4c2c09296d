"""Mixing agents on the simulated backend: the research loop of issue 13, in milliseconds a step.

Every method runs on ``DataMixingEnv`` over ``SimulatedBackend`` (the analytic pretraining model of
``envs.simulated``) for ``--steps`` decisions and ``--seeds`` seeds, in two worlds:

* ``hub``: the backend's default five domains (three ordinary ones, a ``wiki`` hub aligned with all of
  them, an opposed junk domain): more weight on the hub pays;
* ``complementary``: four targets that share a little of one direction and each add their own (no hub)
  and the opposed junk domain: the best mixture is interior (junk at the floor, the rest spread).

Methods: static uniform, the greedy mixer, mirror descent, ODM's smoothed mean, and AC-ODM variants
(the old default: ``mixture`` reward and ODM teacher without a KL term; the ``direction`` reward without
a KL term; the KL term against a uniform, warm-up-mean or teacher prior; the default). The env's
reward is ``direction`` unless a method says otherwise; the floor is 0.02; the agent settings are the
CPU configs' (small networks, gamma 0.5, tau 0.05).

Printed (and appended to RESULTS.md with ``--results``): per world and method, the final noise-free
validation ``val/mean_ppl`` (mean ± sd over seeds), the mean reward and the mean mixture over the last
50 decisions, and its largest weight.

Usage::

    .venv/bin/python benchmarks/agent_sim.py                 # both worlds, 3 seeds, 200 decisions
    .venv/bin/python benchmarks/agent_sim.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import append_section, command_line, git_revision, machine_summary, markdown_table, utc_now

from agents.base import Transition

log = logging.getLogger("agent_sim")

FLOOR = 0.02
AGENT_BASE: dict[str, Any] = {
    "hidden_width": 128,
    "num_hidden_layers": 2,
    "batch_size": 32,
    "warmup_fraction": 0.1,
    "gamma": 0.5,
    "tau": 0.05,
    "exploration": {"scale": 0.3, "decay": 0.99},
}
# name -> (agent overrides, env.reward_mode)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "uniform": ({"kind": "uniform"}, "direction"),
    "greedy": ({"kind": "greedy"}, "direction"),
    "mirror descent": ({"kind": "mirror_descent"}, "direction"),
    "ODM (smoothed mean)": ({"kind": "smoothed_mean"}, "direction"),
    "AC-ODM old default (mixture reward, ODM teacher, no KL)": (
        {"kind": "ac_odm", "warmup_teacher": "odm", "entropy_coef": 0.0, "exploration": {"scale": 1.0, "decay": 0.99}},
        "mixture",
    ),
    "AC-ODM direction reward, no KL": ({"kind": "ac_odm", "entropy_coef": 0.0}, "direction"),
    "AC-ODM + KL to uniform (1.0)": ({"kind": "ac_odm", "entropy_prior": "uniform"}, "direction"),
    "AC-ODM + KL to warm-up mean (0.3)": (
        {"kind": "ac_odm", "entropy_prior": "warmup", "entropy_coef": 0.3},
        "direction",
    ),
    "AC-ODM + KL to teacher (0.3)": ({"kind": "ac_odm", "entropy_coef": 0.3}, "direction"),
    "AC-ODM default (KL to teacher, 1.0)": ({"kind": "ac_odm"}, "direction"),
    "AC-ODM + KL to teacher (3.0)": ({"kind": "ac_odm", "entropy_coef": 3.0}, "direction"),
}


def run(world: str, agent: dict[str, Any], reward_mode: str, seed: int, steps: int) -> dict[str, Any]:
    """One run; returns the final val/mean_ppl, the last 50 decisions' mean reward and mixture."""
    import torch

    from agents import AgentConfig, build_mixer
    from envs.config import EnvConfig
    from envs.env import DataMixingEnv
    from envs.simulated import SimulatedConfig, complementary_domains

    torch.set_num_threads(1)
    sim = SimulatedConfig(total_steps=steps, **({"domains": complementary_domains()} if world == "complementary" else {}))
    env = DataMixingEnv(simulated=sim, env_config=EnvConfig(reward_mode=reward_mode, action_floor=FLOOR))
    mixer = build_mixer(
        AgentConfig(**{**AGENT_BASE, **agent}),
        env.observation_space,
        env.action_space,
        seed=seed,
        domain_names=env.domain_names,
        natural_weights=env.natural_weights_K,
        total_steps=steps,
        floor=FLOOR,
    )
    obs, _ = env.reset(seed=seed)
    weights, rewards = [], []
    for _ in range(steps):
        action = mixer.act(obs, explore=True)
        next_obs, reward, _, _, info = env.step(action)
        mixer.observe(Transition.from_step(obs, action, reward, next_obs, info))
        mixer.update()
        weights.append(info["weights_K"])
        rewards.append(reward)
        obs = next_obs
    late = np.array(weights[-50:]).mean(axis=0)
    return {
        "ppl": env.evaluate()["val/mean_ppl"],
        "reward": float(np.mean(rewards[-50:])),
        "late_K": late,
        "names": env.domain_names,
    }


def table(world: str, seeds: int, steps: int) -> tuple[list[str], list[list[str]]]:
    """One world's rows: every method over the seeds."""
    rows, names = [], None
    for method, (agent, mode) in METHODS.items():
        runs = [run(world, agent, mode, s, steps) for s in range(seeds)]
        names = runs[0]["names"]
        ppl = np.array([r["ppl"] for r in runs])
        late = np.mean([r["late_K"] for r in runs], axis=0)
        rows.append(
            [
                method,
                mode,
                f"{ppl.mean():.2f} ± {ppl.std(ddof=1) if len(ppl) > 1 else 0:.2f}",
                f"{np.mean([r['reward'] for r in runs]):+.3f}",
                " ".join(f"{w:.2f}" for w in late),
                f"{late.max():.2f}",
            ]
        )
        log.info("%s / %s: %s", world, method, rows[-1][2])
    header = ["method", "reward", "final val/mean_ppl", "reward (last 50)", f"mixture (last 50): {' '.join(names or [])}", "largest"]
    return header, rows


def main(argv: list[str] | None = None) -> int:
    """Run both worlds, print the tables, optionally append them to a results file."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--results", type=Path, default=None, help="append a section to this file")
    args = p.parse_args(argv)
    start, started = time.perf_counter(), utc_now()
    parts = [
        "## Mixing agents on the simulated backend (`benchmarks/agent_sim.py`, issue 13)",
        f"- Command: `{command_line()}`; started {started}; machine: {machine_summary()}; revision {git_revision()}",
        f"- {args.seeds} seeds, {args.steps} decisions, floor {FLOOR}; ± is the sd over seeds",
        "",
    ]
    for world in ("complementary", "hub"):
        parts += [f"World `{world}`:", "", markdown_table(*table(world, args.seeds, args.steps)), ""]
    parts.append(f"- Wall time {time.perf_counter() - start:.0f} s")
    text = "\n".join(parts)
    print(text)
    if args.results:
        append_section(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
