"""Scratch probe: the real ``run_local`` / ``run_train`` paths of benchmarks/overhead.py part 4, instrumented.

Usage: .venv/bin/python benchmarks/probe_ray_slowdown/real_runs.py local ray local ray ... [--steps 40]

``Pretrainer.train_step`` is wrapped (in this process for ``local``; inside the Ray Train worker for
``ray``, by wrapping ``ray_jobs.train.train_loop_per_worker``) to record per step: wall, the calling
thread's CPU time, involuntary context switches, and the machine's busy cores; and, over the steps after
the first 5, every process's CPU share (to see what else ran). Extra ``--set`` overrides go to both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def instrument(out_path: str, skip: int = 5) -> None:
    """Wrap Pretrainer.train_step so that it records per-step timings into ``out_path`` (JSON)."""
    import threading

    from paired import sys_cpu
    from step_probe import env_info, proc_cpu

    from envs.pretrainer import Pretrainer

    orig = Pretrainer.train_step
    rec: dict[str, Any] = {"wall": [], "cpu": [], "invol": [], "busy": [], "pid": os.getpid()}
    state: dict[str, Any] = {}

    def train_step(self: Any, weights_K: Any) -> Any:
        n = len(rec["wall"])
        if n == skip:
            state["procs0"], state["t0"] = proc_cpu(), time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        b0, _ = sys_cpu()
        w0, c0 = time.perf_counter(), time.thread_time()
        out = orig(self, weights_K)
        w = time.perf_counter() - w0
        rec["wall"].append(w)
        rec["cpu"].append(time.thread_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        rec["invol"].append(r1.ru_nivcsw - r0.ru_nivcsw)
        rec["busy"].append((sys_cpu()[0] - b0) / os.sysconf("SC_CLK_TCK") / w)
        if self.step >= self.total_steps:
            after, dt = proc_cpu(), time.perf_counter() - state["t0"]
            shares = []
            for pid, (cmd, cpu) in after.items():
                d = cpu - state["procs0"].get(pid, (cmd, 0.0))[1]
                if d / dt > 0.005:
                    shares.append((round(d / dt, 3), pid, cmd.strip()[:70]))
            rec["procs"] = sorted(shares, reverse=True)[:12]
            rec["info"] = env_info()
            rec["info"]["thread"] = threading.current_thread().name
            Path(out_path).write_text(json.dumps(rec))
        return out

    Pretrainer.train_step = train_step  # type: ignore[method-assign]


def main() -> None:
    """Run the modes in order, print a table."""
    p = argparse.ArgumentParser()
    p.add_argument("modes", nargs="+", choices=["local", "ray", "ray15"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--ray-set", action="append", default=[], help="overrides for the ray runs only")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without the dashboard")
    args = p.parse_args()
    import ray_jobs.cluster as rc
    import ray_jobs.train as rt

    if args.no_dashboard:
        orig_connect = rc.connect

        def connect(cfg: Any, **kw: Any) -> Any:
            return orig_connect(cfg, **{**kw, "include_dashboard": False})

        rc.connect = connect
    from ray_jobs.config import load_config
    from ray_jobs.driver import run_local

    orig_loop = rt.train_loop_per_worker

    root = Path(tempfile.mkdtemp(prefix="real-runs-", dir=REPO / "runs" / "bench"))
    n = args.steps
    common = [f"train.total_steps={n}", f"eval.interval={n}", f"checkpoint.interval={n}", "agent.kind=uniform",
              "lm.num_threads=1", "tracking.enabled=false", f"output_dir={root}", "ray.num_workers=1",
              "ray.resources_per_worker={CPU: 1}", *args.set]
    results = []
    try:
        for i, mode in enumerate(args.modes):
            out = str(root / f"rec{i}.json")
            extra = args.ray_set if mode != "local" else []
            cfg = load_config(REPO / "configs/bench-demo.yaml",
                              [*common, *extra, f"name=run{i}", f"ray.enabled={str(mode != 'local').lower()}"])
            t0 = time.perf_counter()
            if mode == "local":
                from envs.pretrainer import Pretrainer

                keep = Pretrainer.train_step
                instrument(out)
                try:
                    run_local(cfg)
                finally:
                    Pretrainer.train_step = keep  # type: ignore[method-assign]
            else:
                def loop(config: dict[str, Any], _out: str = out, _here: str = str(Path(__file__).parent)) -> None:
                    sys.path.insert(0, _here)
                    from real_runs import instrument as inst

                    inst(_out)
                    orig_loop(config)

                rt.train_loop_per_worker = loop
                if mode == "ray15":
                    os.environ["RAY_worker_niceness"] = "15"  # Ray's default (cluster.local_system_config yields)
                try:
                    rt.run_train(cfg)
                finally:
                    rt.train_loop_per_worker = orig_loop
                    os.environ.pop("RAY_worker_niceness", None)
            rec = json.loads(Path(out).read_text())
            import pandas as pd

            led = pd.read_parquet(cfg.run_dir / "ledger.parquet").sort_values("step")
            diffs = led["wall_time"].diff()
            keep = (led["step"] > 1) & led["val/mean_ppl"].isna() & diffs.notna()
            rec["ledger_wall_med"] = float(diffs[keep].median())
            rec["outside_med"] = float((diffs - led["time/step_s"])[keep].median())
            rec["agent_med"] = float(led["time/agent_s"][keep].median())
            rec["mode"], rec["total_s"] = mode, time.perf_counter() - t0
            results.append(rec)
            w, c = rec["wall"][5:], rec["cpu"][5:]
            print(f"[{i}] {mode}: wall med {1e3 * statistics.median(w):.0f} ms, cpu med {1e3 * statistics.median(c):.0f}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load {os.getloadavg()}")
    for rec in results:
        w, c = rec["wall"][5:], rec["cpu"][5:]
        info = rec["info"]
        print(f"{rec['mode']:>6}: wall min/med/mean {1e3 * min(w):.0f}/{1e3 * statistics.median(w):.0f}/"
              f"{1e3 * statistics.mean(w):.0f} ms  thread cpu med {1e3 * statistics.median(c):.0f} ms  "
              f"cpu/wall {sum(c) / sum(w):.3f}  invol/step {statistics.mean(rec['invol'][5:]):.1f}  "
              f"ledger wall med {1e3 * rec['ledger_wall_med']:.0f} outside {1e3 * rec['outside_med']:.1f} "
              f"agent {1e3 * rec['agent_med']:.1f} ms  busy cores {statistics.mean(rec['busy'][5:]):.2f}  nice {info['nice']} thread {info['thread']} "
              f"torch {info['torch_threads']}/{info['interop_threads']} env {info['env']}")
        for share in rec["procs"][:8]:
            print(f"          {share}")


if __name__ == "__main__":
    main()
