"""Scratch probe: time the bare LM train step in a plain process, a Ray actor and a Ray Train V2 worker.

Usage: .venv/bin/python benchmarks/probe_ray_slowdown/step_probe.py MODE [MODE ...] [--steps N]
MODE in plain, actor, task, train. Prints one JSON line per mode plus a table.

Per step it records wall (perf_counter), the calling thread's CPU (thread_time), the process's CPU
(process_time) and context switches; around the timed window it samples every process's CPU time from
/proc so that daemons eating CPU show up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user+sys) of every process, by pid."""
    out: dict[int, tuple[str, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:90]
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        out[int(d)] = (cmd or s[s.find("(") + 1:s.rfind(")")], (int(rest[11]) + int(rest[12])) / CLK)
    return out


def env_info() -> dict[str, Any]:
    """Everything that might differ between a plain process and a Ray worker."""
    import torch

    maps = Path("/proc/self/maps").read_text()
    status = Path("/proc/self/status").read_text()
    threads = next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:"))
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP", "MKL", "KMP", "OPENBLAS", "LD_PRELOAD", "MALLOC", "GOMP", "RAY_TRAIN"))},
        "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.nice(0),
        "switchinterval": sys.getswitchinterval(),
        "main_thread": threading.current_thread() is threading.main_thread(),
        "os_threads": int(threads),
        "py_threads": [t.name for t in threading.enumerate()][:30],
        "jemalloc": "jemalloc" in maps,
        "tcmalloc": "tcmalloc" in maps,
        "sched": os.sched_getscheduler(0),
        "mkl_cfg": torch.__config__.parallel_info().splitlines()[:8],
    }


def measure(steps: int = 30, warmup: int = 5, threads: int = 1, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the bench-demo LM backend and time ``steps`` train steps after ``warmup``."""
    import numpy as np
    import torch

    from envs.backends import LMBackend
    from ray_jobs.config import load_config

    os.chdir(REPO)
    torch.set_num_threads(threads)
    cfg = load_config(REPO / "configs/bench-demo.yaml", ["train.total_steps=1000"])
    be = LMBackend(cfg)
    be.reset(0)
    w = np.full(len(cfg.data.domain_names), 1.0 / len(cfg.data.domain_names))
    for _ in range(warmup):
        be.step(w)
    walls, tcpu, pcpu, inner = [], [], [], []
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    before = proc_cpu()
    t_start = time.perf_counter()
    for _ in range(steps):
        w0, t0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        sig = be.step(w)
        walls.append(time.perf_counter() - w0)
        tcpu.append(time.thread_time() - t0)
        pcpu.append(time.process_time() - p0)
        inner.append(float(getattr(sig, "timings", {}).get("step", float("nan"))) if hasattr(sig, "timings") else float("nan"))
    window = time.perf_counter() - t_start
    after = proc_cpu()
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    busy = []
    for pid, (cmd, cpu) in after.items():
        d = cpu - before.get(pid, (cmd, 0.0))[1]
        if d > 0.02:
            busy.append((round(d / window, 3), pid, cmd))
    busy.sort(reverse=True)
    med = statistics.median
    return {
        "wall_ms": [round(1e3 * min(walls), 1), round(1e3 * med(walls), 1), round(1e3 * max(walls), 1)],
        "thread_cpu_ms": [round(1e3 * min(tcpu), 1), round(1e3 * med(tcpu), 1), round(1e3 * max(tcpu), 1)],
        "proc_cpu_ms_med": round(1e3 * med(pcpu), 1),
        "cpu_over_wall": round(sum(tcpu) / sum(walls), 3),
        "vol_csw": ru1.ru_nvcsw - ru0.ru_nvcsw,
        "invol_csw": ru1.ru_nivcsw - ru0.ru_nivcsw,
        "busy_procs_cpu_share": busy[:10],
        "info": env_info(),
        "extra": extra or {},
    }


def run_mode(mode: str, steps: int, threads: int) -> dict[str, Any]:
    """One measurement in the given place."""
    if mode == "plain":
        return measure(steps, threads=threads)
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=mode.startswith("train"), _node_ip_address="127.0.0.1",
                 configure_logging=False)
    if mode == "actor":
        @ray.remote(num_cpus=1)
        class A:
            def go(self, steps: int, threads: int) -> dict[str, Any]:
                return measure(steps, threads=threads)
        a = A.remote()
        return ray.get(a.go.remote(steps, threads))
    if mode == "actor_thread":
        # a threaded actor runs methods in a non-main thread, like Train V2's train function
        @ray.remote(num_cpus=1, max_concurrency=2)
        class B:
            def go(self, steps: int, threads: int) -> dict[str, Any]:
                return measure(steps, threads=threads)
        b = B.remote()
        return ray.get(b.go.remote(steps, threads))
    if mode == "task":
        return ray.get(ray.remote(num_cpus=1)(measure).remote(steps, threads=threads))
    if mode.startswith("train"):
        import ray.train
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        out: dict[str, Any] = {}

        def loop(config: dict[str, Any]) -> None:
            res = measure(config["steps"], threads=config["threads"])
            Path(config["out"]).write_text(json.dumps(res))

        outfile = Path(f"/tmp/step_probe_{os.getpid()}.json")
        trainer = TorchTrainer(
            loop,
            train_loop_config={"steps": steps, "threads": threads, "out": str(outfile)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="probe", storage_path="/tmp/step_probe_storage"),
        )
        trainer.fit()
        out = json.loads(outfile.read_text())
        outfile.unlink()
        return out
    raise ValueError(mode)


def main() -> None:
    """Run the modes in order."""
    p = argparse.ArgumentParser()
    p.add_argument("modes", nargs="+")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    results = []
    for mode in args.modes:
        r = run_mode(mode, args.steps, args.threads)
        r["mode"] = mode
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"load {os.getloadavg()}")
    for r in results:
        print(f"{r['mode']:>12} wall {r['wall_ms']} thread_cpu {r['thread_cpu_ms']} cpu/wall {r['cpu_over_wall']} "
              f"invol_csw {r['invol_csw']} vol_csw {r['vol_csw']} torch {r['info']['torch_threads']}/"
              f"{r['info']['interop_threads']} main {r['info']['main_thread']} osthreads {r['info']['os_threads']}")


if __name__ == "__main__":
    main()
