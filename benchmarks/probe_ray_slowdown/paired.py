"""Scratch probe: the bare LM train step in several places, taking turns, so all see the same machine load.

Usage: .venv/bin/python benchmarks/probe_ray_slowdown/paired.py SIDE [SIDE ...] [--rounds R] [--block K]
SIDE is one of
  plain        a subprocess without Ray (like run_local)
  actor        a plain @ray.remote actor (num_cpus=1)
  train        a Ray Train V2 worker (TorchTrainer, ScalingConfig(num_workers=1, CPU 1))
and may take options after a colon, comma-separated: ``nice0`` (the side sets its niceness to 0 first),
``nice15`` (to 15), ``thread`` (run the steps in a non-main thread).

The sides build the same backend (bench-demo, 1 torch thread), warm up, then take turns through FIFOs:
side i runs ``block`` steps while every other side blocks in ``read()`` (no polling), then passes the
turn on. Each side reports per-step wall and thread CPU. Env vars for the Ray cluster (e.g.
RAY_worker_niceness) are inherited from this process, since it starts the local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def sys_cpu() -> tuple[float, float]:
    """(busy, steal) jiffies of the whole machine."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    return float(v[0] + v[1] + v[2] + v[5] + v[6]), float(v[7])


def side_main(idx: int, n_sides: int, work: str, spec: str, rounds: int, block: int, threads: int) -> dict[str, Any]:
    """Build, warm up, then take turns; returns per-step timings and the process's situation."""
    opts = set(spec.split(":", 1)[1].split(",")) if ":" in spec else set()
    if "nice0" in opts:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    if "nice15" in opts:
        os.setpriority(os.PRIO_PROCESS, 0, 15)
    import numpy as np
    import torch
    from step_probe import env_info

    from envs.backends import LMBackend
    from ray_jobs.config import load_config

    torch.set_num_threads(threads)
    cfg = load_config(REPO / "configs/bench-demo.yaml", ["train.total_steps=1000"])
    os.chdir(REPO)
    be = LMBackend(cfg)
    be.reset(0)
    w = np.full(len(cfg.data.domain_names), 1.0 / len(cfg.data.domain_names))
    result: dict[str, Any] = {}

    def body() -> None:
        for _ in range(5):
            be.step(w)
        Path(work, f"ready{idx}").touch()
        me = os.open(Path(work, f"fifo{idx}"), os.O_RDWR)
        nxt = os.open(Path(work, f"fifo{(idx + 1) % n_sides}"), os.O_RDWR)
        if idx == 0:
            while sum(Path(work, f"ready{i}").exists() for i in range(n_sides)) < n_sides:
                time.sleep(0.1)
        walls, cpus, blocks, flts, syss = [], [], [], [], []
        for r in range(rounds):
            if not (idx == 0 and r == 0):
                os.read(me, 1)
            b0, s0 = sys_cpu()
            t_block = time.perf_counter()
            for _ in range(block):
                r0 = resource.getrusage(resource.RUSAGE_THREAD)
                w0, c0 = time.perf_counter(), time.thread_time()
                be.step(w)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.thread_time() - c0)
                r1 = resource.getrusage(resource.RUSAGE_THREAD)
                flts.append(r1.ru_minflt - r0.ru_minflt)
                syss.append(r1.ru_stime - r0.ru_stime)
            dt = time.perf_counter() - t_block
            b1, s1 = sys_cpu()
            tick = os.sysconf("SC_CLK_TCK")
            blocks.append({"busy_cores": round((b1 - b0) / tick / dt, 2), "steal": round((s1 - s0) / tick / dt, 3)})
            os.write(nxt, b"x")
        result.update(walls=walls, cpus=cpus, blocks=blocks, flts=flts, syss=syss, info=env_info())

    if "thread" in opts:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    else:
        body()
    result["spec"] = spec
    Path(work, f"result{idx}.json").write_text(json.dumps(result))
    return result


def main() -> None:
    """Start every side, wait for them, print a table."""
    p = argparse.ArgumentParser()
    p.add_argument("sides", nargs="+")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="paired-")
    n = len(args.sides)
    for i in range(n):
        os.mkfifo(Path(work, f"fifo{i}"))
    import subprocess

    procs, ths = [], []
    need_ray = any(not s.startswith("plain") for s in args.sides)
    if need_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=any(s.startswith("train") for s in args.sides),
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
    for i, spec in enumerate(args.sides):
        kind = spec.split(":")[0]
        call = (i, n, work, spec, args.rounds, args.block, args.threads)
        if kind == "plain":
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"from paired import side_main; side_main(*{call!r})")
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
        elif kind == "actor":
            import ray

            @ray.remote(num_cpus=0)  # the train worker takes 1 of the 2 CPUs; sides never overlap
            class Side:
                def go(self, call: tuple) -> None:
                    sys.path.insert(0, str(Path(__file__).resolve().parent))
                    from paired import side_main as sm

                    sm(*call)

            a = Side.remote()
            ths.append(("ray", a.go.remote(call)))
        elif kind == "train":
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            def loop(config: dict[str, Any]) -> None:
                sys.path.insert(0, config["here"])
                from paired import side_main as sm

                sm(*config["call"])

            trainer = TorchTrainer(
                loop, train_loop_config={"call": call, "here": str(Path(__file__).resolve().parent)},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"paired{i}", storage_path="/tmp/paired_storage"),
            )
            th = threading.Thread(target=trainer.fit, daemon=True)
            th.start()
            ths.append(("thread", th))
        else:
            raise ValueError(spec)
    for p_ in procs:
        p_.wait()
    for kind, h in ths:
        if kind == "ray":
            import ray

            ray.get(h)
        else:
            h.join()
    print(f"load {os.getloadavg()}  sides {args.sides}  rounds {args.rounds} x block {args.block}")
    res = [json.loads(Path(work, f"result{i}.json").read_text()) for i in range(n)]
    base = statistics.median(res[0]["walls"])
    for r in res:
        w, c = r["walls"], r["cpus"]
        med = statistics.median(w)
        info = r["info"]
        print(f"{r['spec']:>16}: wall min/med/mean {1e3 * min(w):.0f}/{1e3 * med:.0f}/{1e3 * statistics.mean(w):.0f} ms "
              f"({med / base - 1:+.1%} vs first)  thread cpu med {1e3 * statistics.median(c):.0f} ms  "
              f"cpu/wall {sum(c) / sum(w):.3f}  minflt/step {statistics.mean(r['flts']):.0f} "
              f"sys ms/step {1e3 * statistics.mean(r['syss']):.1f}  nice {info['nice']} main {info['main_thread']} "
              f"torch {info['torch_threads']}/{info['interop_threads']} osthreads {info['os_threads']} "
              f"env {info['env']} busy {statistics.mean(b['busy_cores'] for b in r['blocks']):.2f} "
              f"steal {statistics.mean(b['steal'] for b in r['blocks']):.3f}")
    # per-round paired ratios against side 0
    k = args.block
    for r in res[1:]:
        ratios = [statistics.median(r["walls"][j * k:(j + 1) * k]) / statistics.median(res[0]["walls"][j * k:(j + 1) * k])
                  for j in range(args.rounds)]
        print(f"{r['spec']:>16}: per-round median ratio vs {res[0]['spec']}: "
              f"{' '.join(f'{x:.2f}' for x in ratios)}  median {statistics.median(ratios):.3f}")
    import math

    for r in res[1:]:
        for key in ("walls", "cpus"):
            lr = [math.log(a / b) for a, b in zip(r[key], res[0][key], strict=True)]
            m, se = statistics.mean(lr), statistics.stdev(lr) / math.sqrt(len(lr))
            print(f"{r['spec']:>16}: paired per-step {key} ratio vs {res[0]['spec']}: geo-mean {math.exp(m):.3f} "
                  f"(95% CI {math.exp(m - 2 * se):.3f}-{math.exp(m + 2 * se):.3f}, n={len(lr)})")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if need_ray:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
