"""Scratch: per-step wall/thread-CPU series of the bare LM step in this process (noise check)."""
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from envs.backends import LMBackend  # noqa: E402
from ray_jobs.config import load_config  # noqa: E402

os.chdir(REPO)
torch.set_num_threads(1)
cfg = load_config(REPO / "configs/bench-demo.yaml", ["train.total_steps=1000"])
be = LMBackend(cfg)
be.reset(0)
w = np.full(6, 1 / 6)
out = []
for _i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
    w0, c0 = time.perf_counter(), time.thread_time()
    s = be.step(w)
    out.append((time.perf_counter() - w0, time.thread_time() - c0, s.timings if hasattr(s, "timings") else None))
print(" ".join(f"{1e3 * a:.0f}" for a, _, _ in out))
print(" ".join(f"{1e3 * b:.0f}" for _, b, _ in out))
print(out[-1][2])
