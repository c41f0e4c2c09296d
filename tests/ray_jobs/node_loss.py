"""Lose a node of a two-node Ray cluster in the middle of an ``acodm`` run, and measure the recovery.

Run as a script (``python -m tests.ray_jobs.node_loss OUT_DIR``; ``test_node_loss.py`` does, and checks
what it prints). On this machine it starts a two-node cluster on 127.0.0.1 with ``ray.cluster_utils``:
a head node (1 CPU and a ``head`` resource) and a second node (1 CPU). The run has two Ray Train LM
workers of 0.9 CPU each, so one lands on each node, and the AC-ODM agent actor asks for a sliver of
``head``, so it runs on the head. Once a checkpoint is persisted and the run is a few steps past it, the
second node is killed (``remove_node(allow_graceful=False)``: its raylet and every process on it die at
once, as when a machine drops off the network). Ray Train (``ray.max_failures: 1``) restarts the worker
group, which needs two 0.9-CPU slots; a replacement node joins (as a cluster's autoscaler or a node
manager would bring one), the workers restore the newest checkpoint, and the run finishes.

Prints one JSON line: where every worker and the agent ran, the step at which the node died, the
checkpoint it resumed from, and the times (seconds from the kill): until the new worker group restored
the checkpoint (``resumed_s``) and until the first step after it finished (``first_step_s``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from ray_jobs.cluster import loopback_only
from ray_jobs.config import ExperimentConfig
from tests.conftest import DOMAINS
from tests.conftest import experiment as shared_experiment
from tests.envs.lm_fixtures import make_synthetic_corpus

TOTAL_STEPS = 40
KILL_AFTER_STEP = 10  # a checkpoint at 8 is persisted by then; steps 9-10 are redone after the restart
STEP_LINE = re.compile(r"train (\d+)/\d+ \(")  # the progress line (ray_jobs.progress.ProgressLine)


def experiment(prepared: Path, out: Path) -> ExperimentConfig:
    """Two 0.9-CPU Ray Train workers, the AC-ODM agent on the head, a checkpoint every 4 steps."""
    return ExperimentConfig.from_dict(shared_experiment(prepared, out, **{
        "train.total_steps": TOTAL_STEPS, "train.log_interval": 1, "checkpoint.keep_last": 3,
        "agent": {"kind": "ac_odm", "hidden_width": 32, "num_hidden_layers": 2, "batch_size": 4,
                  "warmup_fraction": 0.25},
        "ray": {"enabled": True, "num_workers": 2, "resources_per_worker": {"CPU": 0.9},
                "agent_resources": {"head": 0.01}, "max_failures": 1},
    }))  # fmt: skip


def _steps_logged(run_log: Path) -> list[int]:
    try:
        return [int(m.group(1)) for m in STEP_LINE.finditer(run_log.read_text())]
    except OSError:
        return []


def _placement() -> dict[str, list[str]]:
    """Node IDs of the alive Ray Train workers and agent learner actors (from the GCS actor table)."""
    out: dict[str, list[str]] = {"RayTrainWorker": [], "Learner": []}
    for info in ray._private.state.actors().values():
        if info["State"] == "ALIVE" and info["ActorClassName"] in out:
            out[info["ActorClassName"]].append(info["Address"]["NodeID"])
    return out


def _wait(predicate: Any, what: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.1)


def main(out_dir: Path) -> dict[str, Any]:
    """Run the scenario under ``out_dir``; return the measurements."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepared = out_dir / "prepared"
    make_synthetic_corpus(prepared, domain_names=DOMAINS, train_tokens=6000, val_tokens=1200)
    cfg = experiment(prepared, out_dir / "runs")
    with loopback_only():  # every node and the driver register and listen on 127.0.0.1
        return _scenario(cfg)


def _scenario(cfg: ExperimentConfig) -> dict[str, Any]:
    from ray_jobs.train import run_train

    run_log = cfg.run_dir / "run.log"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def train() -> None:
        try:
            result.update(run_train(cfg))
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    runner = threading.Thread(target=train, name="acodm-run")
    runner.start()
    try:
        _wait(lambda: failure or max(_steps_logged(run_log), default=0) >= KILL_AFTER_STEP, "the run to reach the kill step")
        if failure:
            raise failure[0]
        before = _placement()
        killed_at = max(_steps_logged(run_log))
        lines_before = len(_steps_logged(run_log))
        kill_time = time.monotonic()
        cluster.remove_node(second, allow_graceful=False)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the replacement
        resumed_s = first_step_s = None
        while runner.is_alive() and (resumed_s is None or first_step_s is None):
            if resumed_s is None and "resumed at step" in run_log.read_text():
                resumed_s = time.monotonic() - kill_time
                lines_before = len(_steps_logged(run_log))
            elif resumed_s is not None and len(_steps_logged(run_log)) > lines_before:
                first_step_s = time.monotonic() - kill_time
            time.sleep(0.05)
        runner.join()
        if failure:
            raise failure[0]
        log_text = run_log.read_text()
        resumed_from = [int(s) for s in re.findall(r"restoring from .*?step[_ ]0*(\d+)", log_text)]
        return {
            "second_node_id": second.node_id,
            "head_node_id": head_id,
            "workers_before": before["RayTrainWorker"],
            "agent_before": before["Learner"],
            "killed_at_step": killed_at,
            "resumed_from_checkpoint": resumed_from,
            "resumed_s": resumed_s,
            "first_step_s": first_step_s,
            "run_dir": str(cfg.run_dir),
            "ledger": str(cfg.run_dir / "ledger.parquet"),
        }
    finally:
        runner.join(timeout=600)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    measured = main(Path(sys.argv[1]))
    print(json.dumps(measured), flush=True)
