"""What a Tune sweep costs per trial on this machine, measured in one run against a direct launch.

Part 1, per-trial overhead: the same tiny pretraining run (synthetic 3-domain corpus, AC-ODM, one Ray
Train worker, MLflow on) launched three ways in one local Ray (started once, so none pays for it):

* **direct**: ``ray_jobs.train.run_train(cfg)`` (``acodm train``): a Ray Train run with its MLflow run;
* **sweep of 1**: ``ray_jobs.tune.run_tune(cfg)`` with a one-point ``param_space``: the same run as the
  only trial of a sweep, i.e. plus the Tune trial actor, the report relay, a Tune checkpoint per
  checkpoint, the MLflow parent run, the results table, the plot and ``best.yaml``;
* **sweep of 3**: the same run three times, one trial at a time.

Per trial inside a sweep = (sweep of 3 - sweep of 1) / 2, so the per-trial overhead is that minus
direct, and the sweep's fixed cost is sweep of 1 minus one trial. The three alternate ``--repeats``
times (so all see the same machine load); the script prints each wall time and the medians, and the
compute inside a run (sum of the ledger's ``time/step_s``) to show how much of any of them is fixed cost.

Part 2, ``--demo``: ``configs/tune-demo.yaml`` as shipped (4 trials of 150 steps, ASHA, 2 at a time;
needs the demo corpus: ``make demo`` or ``acodm data demo data/demo/raw && acodm data prepare
configs/demo.yaml``), written to a temporary directory; prints the wall time, trials/hour and the
trials' statuses. ``--demo-steps N`` shortens the trials (N must be a multiple of 50).

Usage:
    .venv/bin/python benchmarks/bench_tune.py --repeats 2
    .venv/bin/python benchmarks/bench_tune.py --demo [--no-overhead]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as acodm train/tune set it
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from ray_jobs.config import ExperimentConfig, apply_overrides, load_yaml  # noqa: E402
from tests.envs.lm_fixtures import make_synthetic_corpus  # noqa: E402

DOMAINS = ("alpha", "beta", "gamma")


def tiny_config(prepared: Path, out: Path, name: str, steps: int, trials: int = 1) -> ExperimentConfig:
    """The measured run: 3 domains, a 0.12M-parameter LM, AC-ODM, one Ray Train worker, MLflow on; as a
    sweep, ``trials`` identical trials one after the other."""
    return ExperimentConfig.from_dict({
        "name": name, "output_dir": str(out), "seed": 0,
        "data": {"prepared_dir": str(prepared),
                 "domains": [{"name": d, "source": {"paths": [f"/unused/{d}.jsonl"]}} for d in DOMAINS]},
        "lm": {"preset": "tiny", "seq_len": 32, "precision": "fp32", "num_threads": 1, "num_layers": 2,
               "hidden_size": 64, "num_heads": 2},
        "sampler": {"micro_batch_size": 2, "grad_accum": 3},
        "train": {"total_steps": steps, "log_interval": 5},
        "eval": {"interval": steps // 2, "max_batches": 2, "batch_size": 4},
        "checkpoint": {"interval": steps // 2, "keep_last": 2},
        "agent": {"kind": "ac_odm", "hidden_width": 16, "num_hidden_layers": 1, "batch_size": 4},
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 0.9}},
        "tune": {"param_space": {"agent.gamma": {"grid": [0.95] * trials}}, "num_samples": 1,
                 "scheduler": "none", "max_concurrent_trials": 1},
    })


def compute_s(run_dir: Path) -> float:
    """Seconds of optimiser steps inside a run (its ledger's ``time/step_s``)."""
    return float(pd.read_parquet(run_dir / "ledger.parquet")["time/step_s"].sum())


def overhead(repeats: int, steps: int, root: Path) -> None:
    from ray_jobs.train import run_train
    from ray_jobs.tune import run_tune

    prepared = root / "prepared"
    make_synthetic_corpus(prepared, domain_names=DOMAINS, train_tokens=20000, val_tokens=2000)
    times: dict[str, list[float]] = {"direct": [], "sweep1": [], "sweep3": []}
    compute: list[float] = []
    for i in range(repeats):
        cfg = tiny_config(prepared, root / f"direct{i}", "run", steps)
        start = time.perf_counter()
        run_train(cfg)
        times["direct"].append(time.perf_counter() - start)
        compute.append(compute_s(cfg.run_dir))
        for trials in (1, 3):
            cfg = tiny_config(prepared, root / f"sweep{trials}-{i}", "sweep", steps, trials)
            start = time.perf_counter()
            summary = run_tune(cfg)
            times[f"sweep{trials}"].append(time.perf_counter() - start)
            assert summary["num_completed"] == trials, summary
        print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    direct, one, three = (statistics.median(times[k]) for k in ("direct", "sweep1", "sweep3"))
    per_trial = (three - one) / 2
    print(f"\n== per-trial overhead ({steps} steps, {repeats} repeats, medians) ==")
    print(f"direct run_train           : {direct:7.1f} s  (of which optimiser steps {statistics.median(compute):.1f} s)")
    print(f"sweep of 1 trial           : {one:7.1f} s")
    print(f"sweep of 3 trials (serial) : {three:7.1f} s")
    print(f"one trial inside a sweep   : {per_trial:7.1f} s  = direct {per_trial - direct:+.1f} s "
          f"({per_trial / direct:.2f}x): Tune + MLflow overhead per trial")
    print(f"fixed cost of a sweep      : {one - per_trial:7.1f} s  (Tuner, parent run, results, plot, best.yaml)")


def demo_sweep(root: Path, steps: int | None) -> None:
    from ray_jobs.tune import run_tune

    os.chdir(REPO)  # the demo config's paths are relative to the repository
    data = load_yaml(REPO / "configs" / "tune-demo.yaml")
    overrides = [f"output_dir={root / 'demo-runs'}"]
    if steps:
        overrides.append(f"train.total_steps={steps}")
    cfg = ExperimentConfig.from_dict(apply_overrides(data, overrides))
    if not (Path(cfg.data.prepared_dir) / "manifest.json").exists():
        print(f"\n(skipping the demo sweep: no prepared corpus in {cfg.data.prepared_dir}; run `make demo`)")
        return
    start = time.perf_counter()
    summary = run_tune(cfg)
    wall = time.perf_counter() - start
    frame = pd.read_parquet(summary["results"])
    print(f"\n== demo sweep (configs/tune-demo.yaml, {cfg.train.total_steps} steps per trial) ==")
    print(frame[["trial_id", "status", "last_step", f"final/{cfg.tune.metric}"]].to_string(index=False))
    print(f"wall {wall:.0f} s for {len(frame)} trials: {len(frame) / (wall / 3600):.1f} trials/hour "
          f"({summary['num_completed']} completed, {summary['num_early_stopped']} early-stopped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps of the overhead run (even)")
    parser.add_argument("--demo", action="store_true", help="also run the demo sweep (trials/hour)")
    parser.add_argument("--demo-steps", type=int, default=None)
    parser.add_argument("--no-overhead", action="store_true", help="skip part 1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
            if not args.no_overhead:
                overhead(args.repeats, args.steps, Path(tmp))
            if args.demo:
                demo_sweep(Path(tmp), args.demo_steps)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
