"""Scratch: does work on the other vCPU slow this one's LM step (shared physical core, cache, memory)?

Pins this process to CPU 0 and a busy loop to CPU 1, and toggles the busy loop (SIGSTOP/SIGCONT) every
block of steps; prints the paired ratio of step times with the other vCPU busy vs idle.
Usage: .venv/bin/python benchmarks/probe_ray_slowdown/sibling.py [ROUNDS] [KIND]; KIND: spin (a Python
busy loop) or mem (a loop streaming through 64 MiB).
"""
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from envs.backends import LMBackend  # noqa: E402
from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.train import configure_malloc  # noqa: E402

os.chdir(REPO)
configure_malloc()
os.sched_setaffinity(0, {0})
torch.set_num_threads(1)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
kind = sys.argv[2] if len(sys.argv) > 2 else "spin"
code = ("while True: pass" if kind == "spin" else
        "import numpy as np\na = np.ones(8 * 2**20)\nwhile True: a += 1.0")
hog = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", code])
try:
    time.sleep(0.5)
    os.kill(hog.pid, signal.SIGSTOP)
    cfg = load_config(REPO / "configs/bench-demo.yaml", ["train.total_steps=1000"])
    be = LMBackend(cfg)
    be.reset(0)
    w = np.full(6, 1 / 6)
    for _ in range(3):
        be.step(w)
    idle, busy = [], []
    for r in range(rounds):
        for state in ("idle", "busy") if r % 2 == 0 else ("busy", "idle"):
            os.kill(hog.pid, signal.SIGCONT if state == "busy" else signal.SIGSTOP)
            time.sleep(0.05)
            ts = []
            for _ in range(2):
                c0 = time.thread_time()
                be.step(w)
                ts.append(time.thread_time() - c0)
            (busy if state == "busy" else idle).append(statistics.mean(ts))
finally:
    hog.kill()
lr = [math.log(b / i) for b, i in zip(busy, idle, strict=True)]
m, se = statistics.mean(lr), statistics.stdev(lr) / math.sqrt(len(lr))
print(f"{kind}: step thread-CPU with CPU 1 idle {1e3 * statistics.median(idle):.0f} ms, busy "
      f"{1e3 * statistics.median(busy):.0f} ms; busy/idle geo-mean {math.exp(m):.3f} "
      f"(95% CI {math.exp(m - 2 * se):.3f}-{math.exp(m + 2 * se):.3f}, n={len(lr)})")
