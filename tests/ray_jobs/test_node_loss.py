"""Losing a node of a two-node cluster mid-run: Ray Train restarts from the last checkpoint, no step twice.

The scenario (two nodes on 127.0.0.1, one LM worker on each, the agent on the head, the second node
killed after step 10, a replacement node joining) is ``tests/ray_jobs/node_loss.py``; it runs in a child
process with its own cluster, and this test checks what it reports and prints the time to recover.
Heavy: about 1.5-3 minutes on the 2-core development VM (``make test-heavy``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.heavy
@pytest.mark.ray
def test_node_loss_resumes_from_the_last_checkpoint_with_every_step_once(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "tests.ray_jobs.node_loss", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    head, second = report["head_node_id"], report["second_node_id"]
    assert sorted(report["workers_before"]) == sorted([head, second]), "one LM worker on each node"
    assert report["agent_before"] == [head], "the agent actor runs on the head"
    killed, resumed = report["killed_at_step"], report["resumed_from_checkpoint"]
    assert len(resumed) == 1 and resumed[0] % 4 == 0 and 0 < resumed[0] < killed, report
    ledger = pd.read_parquet(report["ledger"])
    assert list(ledger["step"]) == list(range(41)), "every step exactly once in the ledger"
    run_log = (Path(report["run_dir"]) / "run.log").read_text()
    assert run_log.count("built tiny") == 2, "one restart of the worker group"
    assert report["resumed_s"] is not None and report["first_step_s"] is not None
    with capsys.disabled():
        print(
            f"\nnode loss at step {killed}: resumed from checkpoint step {resumed[0]} "
            f"{report['resumed_s']:.1f} s after the kill (replacement node start, worker group restart, "
            f"restore), first step done {report['first_step_s']:.1f} s after it; steps redone: {killed - resumed[0]}"
        )
