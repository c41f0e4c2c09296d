"""Scratch probe: the real ``run_local`` and ``run_train`` (1 worker) of overhead.py part 4, run at the
same time with their Pretrainer steps taking turns, so that both see the same machine speed and load.

Usage: .venv/bin/python benchmarks/probe_ray_slowdown/paired_real.py [--steps 60] [--before-fix]

A subprocess runs ``run_local`` (no Ray, like the benchmark's in-process runs); this process runs
``run_train``. ``Pretrainer.train_step`` is wrapped on both sides to wait for its turn (a FIFO read, no
polling), run, record wall and thread CPU time, and pass the turn on. ``--before-fix`` starts the local
Ray as the code did before (workers at niceness 15, the preemption watcher on).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def fixed_malloc() -> None:
    """The Ray worker's malloc settings (ray_jobs.driver.configure_malloc), here too."""
    from ray_jobs.driver import configure_malloc

    assert configure_malloc()


def take_turns(work: str, idx: int) -> None:
    """Wrap Pretrainer.train_step: wait for the turn, time the step, pass the turn to the other side."""
    if os.environ.get("PROBE_FIXED_MALLOC") == "1":
        fixed_malloc()
    from step_probe import env_info

    from envs.pretrainer import Pretrainer

    orig = Pretrainer.train_step
    me = os.open(Path(work, f"fifo{idx}"), os.O_RDWR)
    other = os.open(Path(work, f"fifo{1 - idx}"), os.O_RDWR)
    rec: dict[str, Any] = {"wall": [], "cpu": [], "invol": [], "minflt": [], "sys": []}

    def train_step(self: Any, weights_K: Any) -> Any:
        if not (idx == 0 and not rec["wall"]):
            os.read(me, 1)
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        w0, c0 = time.perf_counter(), time.thread_time()
        out = orig(self, weights_K)
        rec["wall"].append(time.perf_counter() - w0)
        rec["cpu"].append(time.thread_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        rec["invol"].append(r1.ru_nivcsw - r0.ru_nivcsw)
        rec["minflt"].append(r1.ru_minflt - r0.ru_minflt)
        rec["sys"].append(r1.ru_stime - r0.ru_stime)
        if self.step >= self.total_steps:
            rec["info"] = env_info()
            Path(work, f"rec{idx}.json").write_text(json.dumps(rec))
        os.write(other, b"x")
        return out

    Pretrainer.train_step = train_step  # type: ignore[method-assign]


def local_side(work: str, overrides: list[str]) -> None:
    """The in-process run (side 0), in a subprocess without Ray."""
    from ray_jobs.config import load_config
    from ray_jobs.driver import run_local

    take_turns(work, 0)
    run_local(load_config(REPO / "configs/bench-demo.yaml", [*overrides, "name=local", "ray.enabled=false"]))


def main() -> None:
    """Start the in-process side, run the Ray side here, compare."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--before-fix", action="store_true")
    p.add_argument("--fixed-malloc", action="store_true", help="both sides: mallopt fixed thresholds")
    args = p.parse_args()
    if args.fixed_malloc:
        os.environ["PROBE_FIXED_MALLOC"] = "1"
    work = tempfile.mkdtemp(prefix="paired-real-")
    for i in range(2):
        os.mkfifo(Path(work, f"fifo{i}"))
    root = Path(tempfile.mkdtemp(prefix="paired-real-", dir=REPO / "runs" / "bench"))
    n = args.steps
    overrides = [f"train.total_steps={n}", f"eval.interval={n}", f"checkpoint.interval={n}", "agent.kind=uniform",
                 "lm.num_threads=1", "tracking.enabled=false", f"output_dir={root}", "ray.num_workers=1",
                 "ray.resources_per_worker={CPU: 1}"]
    if args.before_fix:
        os.environ["RAY_worker_niceness"] = "15"
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from paired_real import local_side; "
            f"local_side({work!r}, {overrides!r})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # PROBE_* stays
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import ray_jobs.train as rt
    from ray_jobs.config import load_config

    orig_loop = rt.train_loop_per_worker

    def loop(config: dict[str, Any], _work: str = work, _here: str = str(HERE),
             _fixed: bool = args.fixed_malloc) -> None:
        sys.path.insert(0, _here)
        from paired_real import take_turns as tt

        if _fixed:
            os.environ["PROBE_FIXED_MALLOC"] = "1"
        tt(_work, 1)
        orig_loop(config)

    rt.train_loop_per_worker = loop
    try:
        rt.run_train(load_config(REPO / "configs/bench-demo.yaml", [*overrides, "name=ray", "ray.enabled=true"]))
    finally:
        rt.train_loop_per_worker = orig_loop
        child.wait(timeout=300)
        shutil.rmtree(root, ignore_errors=True)
    loc, ray_ = (json.loads(Path(work, f"rec{i}.json").read_text()) for i in range(2))
    shutil.rmtree(work, ignore_errors=True)
    skip = 3
    print(f"load {os.getloadavg()}  steps {n} (first {skip} left out)  before_fix={args.before_fix}")
    for name, r in (("in-process", loc), ("Ray Train", ray_)):
        w, c = r["wall"][skip:], r["cpu"][skip:]
        print(f"{name:>11}: wall min/med/mean {1e3 * min(w):.0f}/{1e3 * statistics.median(w):.0f}/"
              f"{1e3 * statistics.mean(w):.0f} ms  thread cpu med {1e3 * statistics.median(c):.0f} ms  "
              f"cpu/wall {sum(c) / sum(w):.3f}  invol/step {statistics.mean(r['invol'][skip:]):.1f}  "
              f"minflt/step {statistics.mean(r['minflt'][skip:]):.0f}  sys ms/step {1e3 * statistics.mean(r['sys'][skip:]):.1f}  "
              f"nice {r['info']['nice']}  torch {r['info']['torch_threads']}/{r['info']['interop_threads']}")
    for r in (loc, ray_):
        r["user"] = [c - s_ for c, s_ in zip(r["cpu"], r["sys"], strict=True)]
    for key in ("wall", "cpu", "user"):
        lr = [math.log(a / b) for a, b in zip(ray_[key][skip:], loc[key][skip:], strict=True)]
        m, se = statistics.mean(lr), statistics.stdev(lr) / math.sqrt(len(lr))
        print(f"Ray Train / in-process, paired per step, {key}: geo-mean {math.exp(m):.3f} "
              f"(95% CI {math.exp(m - 2 * se):.3f}-{math.exp(m + 2 * se):.3f}, n={len(lr)}); "
              f"ratio of medians {statistics.median(ray_[key][skip:]) / statistics.median(loc[key][skip:]):.3f}")


if __name__ == "__main__":
    main()
