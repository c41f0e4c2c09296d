"""Synthetic run directories written exactly as the run loop writes them (``save_config`` + ``Ledger``).

Three domains ``a``, ``b`` (targets) and ``junk`` (not a target); 40 steps of 1000 tokens; evaluations
at steps 10, 20, 30, 40. At an evaluation with mean perplexity ``m``: ``val/ppl/a = m - 6``,
``val/ppl/b = m + 6`` (so ``val/mean_ppl = m`` and the geometric mean over targets is
``sqrt(m^2 - 36)``) and ``val/ppl/junk = 3m``. The curves below are the hand-computation inputs of
``test_metrics.py`` and ``test_report.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from ray_jobs.config import ExperimentConfig, save_config
from ray_jobs.ledger import Ledger

DOMAINS = ("a", "b", "junk")
EVAL_STEPS = (10, 20, 30, 40)
TOTAL_STEPS = 40
TOKENS_PER_STEP = 1000  # micro_batch_size 2 x grad_accum 4 x seq_len 125, one worker
HALF_GAP = 6.0

# kind -> [(seed, val/mean_ppl at EVAL_STEPS, time/step_s)]
CURVES: dict[str, list[tuple[int, list[float], float]]] = {
    "uniform": [(0, [100, 60, 40, 30], 0.5), (1, [110, 70, 45, 32], 0.6), (2, [105, 65, 42, 31], 0.7)],
    "natural": [(0, [100, 60, 40, 30.5], 0.5), (1, [104, 64, 41, 31.2], 0.5)],
    "ac_odm": [(0, [80, 40, 28, 25], 0.55), (1, [90, 34, 30, 26], 0.65)],
}


def experiment_config(name: str, kind: str, seed: int, output_dir: Path, **agent: Any) -> ExperimentConfig:
    """A valid ExperimentConfig for a synthetic run (validated like a real one)."""
    domains = [{"name": d, "source": {"paths": [f"{d}.jsonl"]}} for d in DOMAINS]
    domains[-1]["target"] = False
    return ExperimentConfig.from_dict({
        "name": name, "output_dir": str(output_dir), "seed": seed,
        "data": {"domains": domains},
        "lm": {"seq_len": 125}, "sampler": {"micro_batch_size": 2, "grad_accum": 4},
        "train": {"total_steps": TOTAL_STEPS}, "eval": {"interval": 10},
        "agent": {"kind": kind, **agent}, "ray": {"enabled": False}, "tracking": {"enabled": False},
    })


def _weights(kind: str, step: int, seed: int) -> list[float]:
    if kind == "uniform":
        return [1 / 3] * 3
    if kind == "natural":
        return [0.5, 0.3, 0.2]
    logits = [math.sin(step / 5 + seed), math.cos(step / 7), -1 + step / 40]
    z = [math.exp(v) for v in logits]
    return [v / sum(z) for v in z]


def ledger_rows(kind: str, seed: int, curve: list[float], step_s: float) -> list[dict[str, Any]]:
    """Ledger rows with every column of the schema in docs/internals.md."""
    rows = []
    for step in range(1, TOTAL_STEPS + 1):
        w = _weights(kind, step, seed)
        mb = [round(x * 8) for x in w]
        row: dict[str, Any] = {
            "step": step, "tokens": step * TOKENS_PER_STEP, "wall_time": step * step_s * 1.1,
            "loss": 5 - step / 20, "lr": 1e-3, "grad_norm": 1.0, "skipped": False,
            "reward": 0.1 * math.sin(step / 3 + seed + len(kind)),
        }
        for i, d in enumerate(DOMAINS):
            row[f"weight/{d}"] = w[i]
            row[f"microbatches/{d}"] = mb[i]
            row[f"tokens/{d}"] = mb[i] * 250
            row[f"loss/{d}"] = 5 - step / 20 + i / 10 if mb[i] else math.nan
            row[f"score/{d}"] = math.cos(step / 4 + i)
            row[f"reward_part/{d}"] = w[i] * math.cos(step / 4 + i)
        if kind == "ac_odm":
            row["agent/critic_loss"] = 1 / step if step >= 5 else math.nan
            row["agent/actor_loss"] = -step / 40 if step >= 5 else math.nan
            row["agent/warmup"] = 1.0 if step < 5 else 0.0
        if step in EVAL_STEPS:
            m = float(curve[EVAL_STEPS.index(step)])
            ppl = {"a": m - HALF_GAP, "b": m + HALF_GAP, "junk": 3 * m}
            for d, p in ppl.items():
                row[f"val/loss/{d}"] = math.log(p)
                row[f"val/ppl/{d}"] = p
            row["val/mean_ppl"] = m
            row["val/weighted_ppl"] = m
            row["val/geo_mean_ppl"] = math.sqrt(m * m - HALF_GAP**2)
        row.update({"time/step_s": step_s, "time/data_s": 0.01, "time/forward_backward_s": step_s * 0.8,
                    "time/optimizer_s": 0.02, "time/probe_s": 0.0, "time/agent_s": 0.001})
        rows.append(row)
    return rows


def write_run(root: Path, kind: str, seed: int, curve: list[float], step_s: float, **agent: Any) -> Path:
    """One run directory (config.yaml + ledger.parquet) under ``root``."""
    name = f"{kind}-s{seed}"
    cfg = experiment_config(name, kind, seed, root, **agent)
    run_dir = root / name
    save_config(cfg, run_dir / "config.yaml")
    Ledger(run_dir / "ledger.parquet", ledger_rows(kind, seed, curve, step_s)).flush()
    return run_dir


@pytest.fixture
def run_dirs(tmp_path: Path) -> dict[str, list[Path]]:
    """The standard synthetic set: uniform x3, natural x2, AC-ODM (online) x2 seeds."""
    return {kind: [write_run(tmp_path / "runs", kind, seed, curve, s) for seed, curve, s in seeds]
            for kind, seeds in CURVES.items()}


@pytest.fixture(scope="module")
def rendered_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[Path]], Path]:
    """The standard set rendered once per module (a full render takes seconds): (run dirs, report dir)."""
    from analysis.report import build_report

    root = tmp_path_factory.mktemp("rendered")
    dirs = {kind: [write_run(root / "runs", kind, seed, curve, s) for seed, curve, s in seeds]
            for kind, seeds in CURVES.items()}
    build_report([d for ds in dirs.values() for d in ds], root / "report")
    return dirs, root / "report"
