"""What the reward says about fixed mixtures on the real tiny LM (issue 13): raw, debiased, smoothed.

One in-process ``DataMixingEnv`` over the LM of ``configs/bench-demo.yaml`` trains with a fixed set of
mixtures taken in turn (step t uses mixture t mod M), so every mixture is scored on the same model at
the same stage of training. Each step's ``TrainSignals`` is scored by the ``direction`` reward three
ways:

* ``raw``: the step's Gram matrix as measured (a domain's own sampling noise sits on the diagonal);
* ``debiased``: the diagonal replaced by its unbiased estimate from each micro-batch's squared norm,
  the step's own matrix (``env.reward_smoothing: 0``);
* ``smoothed``: the debiased matrices averaged over steps (beta 0.9, the default) and projected onto
  the PSD cone, the step scored under the average.

Printed (and appended with ``--results``): per mixture and variant, the mean and sd of the per-step
reward and the share of steps where it was invalid (a non-positive norm estimate). A reward worth
learning from ranks the mixtures as their validation perplexity does (RESULTS.md's static grid) with a
per-step spread well below the gaps between them.

Usage::

    .venv/bin/python benchmarks/reward_signal.py --steps 150
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    REPO_ROOT,
    append_section,
    command_line,
    git_revision,
    machine_summary,
    markdown_table,
    utc_now,
)

log = logging.getLogger("reward_signal")

# name -> weights over (code, docstrings, doc_topics, readmes, licenses, junk)
MIXTURES = {
    "uniform (junk 1/6)": [1, 1, 1, 1, 1, 1],
    "uniform over the targets": [0.196] * 5 + [0.02],
    "prose-heavy": [0.1, 0.1, 0.3, 0.3, 0.2, 0.02],
    "code-heavy (code 0.9)": [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],
    "junk-heavy (junk 0.5)": [0.1] * 5 + [0.5],
}


def main(argv: list[str] | None = None) -> int:
    """Train with the mixtures in turn, score every step three ways, print the table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "bench-demo.yaml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--skip", type=int, default=20, help="first steps left out of the statistics")
    p.add_argument("--results", type=Path, default=None, help="append a section to this file")
    args = p.parse_args(argv)

    import torch

    from envs.env import DataMixingEnv
    from envs.rewards import GramAverage, compute_reward
    from ray_jobs.config import load_config

    torch.set_num_threads(1)
    start, started = time.perf_counter(), utc_now()
    cfg = load_config(args.config)
    env = DataMixingEnv(cfg, backend="lm")
    env.reset(seed=cfg.seed)
    names = list(MIXTURES)
    if len(MIXTURES[names[0]]) != env.num_domains:
        raise SystemExit(f"the mixtures are over 6 domains; {args.config} has {env.num_domains}")
    average = GramAverage(env.num_domains, 0.9)
    scores: dict[str, dict[str, list[float]]] = {n: {"raw": [], "debiased": [], "smoothed": []} for n in names}
    for t in range(args.steps):
        name = names[t % len(names)]
        weights = np.asarray(MIXTURES[name], dtype=np.float64)
        _, _, _, _, info = env.step(weights / weights.sum())
        sig = info["signals"]
        variants = {
            "raw": compute_reward(sig, target_mask_K=env.target_mask_K, debias=False),
            "debiased": compute_reward(sig, target_mask_K=env.target_mask_K),
            "smoothed": compute_reward(sig, target_mask_K=env.target_mask_K, average=average),
        }
        if t >= args.skip:
            for key, result in variants.items():
                scores[name][key].append(result.reward if result.valid else np.nan)
    rows = []
    for name in names:
        row = [name]
        for key in ("raw", "debiased", "smoothed"):
            a = np.array(scores[name][key])
            row.append(f"{np.nanmean(a):.3f} ± {np.nanstd(a):.3f} ({np.isnan(a).mean():.0%} invalid)")
        rows.append(row)
    header = ["mixture", "raw Gram: mean ± sd", "debiased, per step", "debiased, smoothed (default)"]
    text = "\n".join(
        [
            "## What the direction reward says about fixed mixtures (`benchmarks/reward_signal.py`, issue 13)",
            f"- Command: `{command_line()}`; started {started}; machine: {machine_summary()}; "
            f"revision {git_revision()}",
            f"- {args.steps} steps of the bench-demo LM, the mixtures in turn; statistics over steps "
            f"{args.skip + 1}-{args.steps} (mean ± sd of the per-step reward); wall time "
            f"{time.perf_counter() - start:.0f} s",
            "",
            markdown_table(header, rows),
            "",
        ]
    )
    print(text)
    if args.results:
        append_section(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
