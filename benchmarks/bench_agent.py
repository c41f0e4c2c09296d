"""Time AC-ODM's ``act`` and ``update`` on CPU, against the tiny LM's optimiser step measured in the same run.

Sizes:

- ``reference``: the paper's agent, K = 22 Pile domains, S = 3K + 2L + 1 = 85 (L = 9 monitored layers),
  5 hidden layers of width 1024, minibatch 32 (DDPG; also TD3 with twin critics);
- ``cpu-demo``: ``configs/demo.yaml``'s agent, K = 6, S = 27 (L = 4, the tiny LM's blocks), 2 x 128.

The baseline is one optimiser step of the demo's tiny GPT-NeoX (4 x 128, vocab 8192) on CPU: grad_accum
2 micro-batches of 8 x 128 tokens (forward, backward, AdamW). ``act`` runs once per decision on the
LM's critical path, so it must be a small fraction of that step; ``update`` can run asynchronously
beside training (in the agent's Ray actor), so it must fit within one step.

Usage: ``python benchmarks/bench_agent.py [--threads 1] [--repeats 50] [--clock wall|cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from gymnasium import spaces

from agents import ActorCriticMixer, AgentConfig, Transition, build_mixer

SIZES = {
    # name: (K, L, width, layers, num_critics)
    "reference": (22, 9, 1024, 5, 1),
    "reference-td3": (22, 9, 1024, 5, 2),
    "cpu-demo": (6, 4, 128, 2, 1),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _median_s(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return statistics.median(times)


def tiny_lm_step_s(repeats: int) -> float:
    """Median seconds of one tiny-LM optimiser step (2 micro-batches of 8 x 128 tokens)."""
    from envs.config import LMConfig
    from envs.model import build_model

    model = build_model(LMConfig(preset="tiny", seq_len=128), vocab_size=8192, seed=0, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (8, 129), generator=gen) for _ in range(2)]

    def step() -> None:
        for tokens in batches:
            out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
            (out.loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _median_s(step, repeats)


def agent_times(name: str, repeats: int) -> dict[str, float]:
    """Median seconds of ``act`` (exploring, after warmup) and of one ``update`` (minibatch 32)."""
    k, num_layers, width, depth, num_critics = SIZES[name]
    s = 3 * k + 2 * num_layers + 1
    config = AgentConfig(
        hidden_width=width, num_hidden_layers=depth, num_critics=num_critics, warmup_fraction=0.0
    )
    mixer = build_mixer(
        config,
        spaces.Box(-3.0, 3.0, (s,), np.float32),
        spaces.Box(0.0, 1.0, (k,), np.float32),
        seed=0,
        domain_names=[f"d{i}" for i in range(k)],
        total_steps=10_000,
    )
    assert isinstance(mixer, ActorCriticMixer)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=s).astype(np.float32)
    for _ in range(256):  # a replay buffer with some content
        mixer.observe(Transition(obs, mixer.act(obs), 0.0, rng.normal(size=k), obs))
    mixer.update_credit = 0.0

    def update() -> None:
        mixer.update_credit = 1.0
        mixer.update()

    params = (
        sum(p.numel() for p in mixer.actor.parameters()),
        sum(p.numel() for p in mixer.critic.parameters()),
    )
    return {
        "K": k,
        "S": s,
        "actor_params": params[0],
        "critic_params": params[1],
        "act_s": _median_s(lambda: mixer.act(obs, explore=True), repeats),
        "update_s": _median_s(update, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the agent's actor gets 1 core)"
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-lm", action="store_true", help="skip the tiny-LM baseline")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu = process time (for a shared, busy machine)",
    )
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    lm_s = float("nan") if args.no_lm else tiny_lm_step_s(max(5, args.repeats // 5))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"median of {args.repeats} calls"
    )
    print(f"baseline: tiny LM optimiser step (2 x 8 x 128 tokens) = {lm_s * 1e3:.1f} ms\n")
    header = f"{'size':<14} {'K':>3} {'S':>3} {'actor':>9} {'critic':>9} {'act ms':>8} {'update ms':>10}"
    print(header + f" {'act/LM':>8} {'update/LM':>10}")
    print("-" * (len(header) + 20))
    for name in SIZES:
        r = agent_times(name, args.repeats)
        print(
            f"{name:<14} {r['K']:>3} {r['S']:>3} {r['actor_params']:>9,} {r['critic_params']:>9,} "
            f"{r['act_s'] * 1e3:>8.3f} {r['update_s'] * 1e3:>10.2f} "
            f"{r['act_s'] / lm_s:>8.4f} {r['update_s'] / lm_s:>10.3f}"
        )


if __name__ == "__main__":
    main()
