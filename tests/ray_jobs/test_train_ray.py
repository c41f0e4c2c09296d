"""Ray Train runs: 2 gloo workers + agent actor + MLflow; Ray vs in-process equality; worker and agent faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ray_jobs.config import ExperimentConfig
from ray_jobs.driver import run_local
from tests.conftest import DOMAINS, REPO, experiment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

AC_ODM = {
    "agent.kind": "ac_odm",
    "agent.hidden_width": 32,
    "agent.num_hidden_layers": 2,
    "agent.batch_size": 4,
    "agent.warmup_fraction": 0.25,
}


def ray_experiment(prepared: Path, out: Path, **over: object) -> dict:
    base = {"ray.enabled": True, "ray.num_workers": 2, "ray.resources_per_worker": {"CPU": 0.9}}
    return experiment(prepared, out, **{**base, **over})


def test_two_workers_with_agent_actor_log_to_sqlite_mlflow(ray_session, prepared: Path, tmp_path: Path,
                                                           caplog) -> None:
    from mlflow.tracking import MlflowClient

    from ray_jobs.train import run_train

    caplog.set_level("INFO")
    cfg = ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path, **AC_ODM, **{"tracking.enabled": True}))
    summary = run_train(cfg)
    # the driver shows rank 0's progress line and records, relayed (Ray forwards no worker output here)
    shown = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in shown if m.startswith("train ")] == [f"train {s}/12" for s in range(2, 13, 2)]
    assert "step 0/12 (untrained)" in "\n".join(shown)
    assert f"checkpoint step 12 -> {tmp_path / 't' / 'checkpoints' / 'step_00000012'}" in shown
    assert "train 12/12 (100%)" in (tmp_path / "t" / "run.log").read_text()  # and rank 0 still writes run.log
    ledger = pd.read_parquet(tmp_path / "t" / "ledger.parquet")
    assert list(ledger["step"]) == list(range(13))  # step 0: the untrained model's evaluation
    # two ranks: each step has 2 workers x 3 micro-batches, all-reduced into the global counts
    assert (ledger[[f"microbatches/{d}" for d in DOMAINS]].iloc[1:].sum(axis=1) == 6).all()
    assert ledger["agent/critic_loss"].notna().any(), "the agent actor never reported an update"
    uri = summary["mlflow_uri"]
    assert uri.startswith("sqlite:///")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("acodm").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["agent.kind"] == "ac_odm"
    for key in ("lm/loss/alpha", "mix/weight/gamma", "env/reward", "env/score/beta", "val/mean_ppl",
                "val/ppl/alpha", "perf/tokens_per_s", "perf/step_s", "agent/critic_loss", "agent/actor_loss"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val/mean_ppl")
    assert [m.step for m in history] == [0, 4, 8, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ledger.parquet", "policy.pt"} <= artifacts


def test_run_against_an_http_mlflow_server(ray_session, prepared: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from ray_jobs.train import run_train
    from tests.ray_jobs.ray_helpers import MlflowServer

    server = MlflowServer(tmp_path / "server").start()
    try:
        over = {**AC_ODM, "ray.num_workers": 1, "train.total_steps": 8, "tracking.enabled": True,
                "tracking.mlflow_uri": server.url, "tracking.experiment_name": "http-test"}
        run_train(ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path, **over)))
        client = MlflowClient(tracking_uri=server.url)
        exp = client.get_experiment_by_name("http-test")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        assert {"val/mean_ppl", "lm/loss/alpha", "mix/weight/beta", "agent/critic_loss"} <= set(run.data.metrics)
        assert {"config.yaml", "ledger.parquet", "policy.pt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.stop()


def test_one_worker_ray_run_matches_the_in_process_run(ray_session, prepared: Path, tmp_path: Path) -> None:
    from ray_jobs.train import run_train

    over = {"agent.kind": "natural", "train.total_steps": 20, "checkpoint.interval": 10, "eval.interval": 10}
    run_local(ExperimentConfig.from_dict(experiment(prepared, tmp_path / "local", **over)))
    run_train(ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path / "ray", **over, **{"ray.num_workers": 1})))
    local = pd.read_parquet(tmp_path / "local" / "t" / "ledger.parquet")
    remote = pd.read_parquet(tmp_path / "ray" / "t" / "ledger.parquet")
    counts = [f"microbatches/{d}" for d in DOMAINS]
    np.testing.assert_array_equal(local[counts].to_numpy(), remote[counts].to_numpy())
    losses = ["loss", *[f"loss/{d}" for d in DOMAINS], "val/mean_ppl"]
    np.testing.assert_allclose(remote[losses].to_numpy(), local[losses].to_numpy(), rtol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------------------------- faults
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _find_process(root: int, title: str) -> int | None:
    """A descendant of ``root`` whose process title starts with ``title`` (Ray's ``ray::Class`` titles)."""
    for pid in _descendants(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title):
            return pid
    return None


def _run_and_kill(tmp_path: Path, prepared: Path, title: str, over: dict) -> tuple[subprocess.CompletedProcess, Path]:
    """Start ``acodm train`` with its own local Ray, SIGKILL one of its ``title`` processes after the
    first checkpoint, and wait for the run to end."""
    data = ray_experiment(prepared, tmp_path, **over)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1")
    log_path = tmp_path / "train.out"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ray_jobs", "train", str(cfg_path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "t"
    killed = None
    deadline = time.monotonic() + 600
    from ray_jobs.checkpoints import load_latest_checkpoint

    while time.monotonic() < deadline and proc.poll() is None:
        # kill once a checkpoint is completely persisted (killing mid-copy would leave none to resume)
        if (run_dir / "checkpoints" / "step_00000004").exists() and load_latest_checkpoint(run_dir) is not None:
            killed = _find_process(proc.pid, title)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    assert killed is not None, f"found no {title} process to kill:\n{log_path.read_text()[-3000:]}"
    proc.wait(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log_path.read_text(), ""), run_dir


def test_killed_worker_restarts_from_the_latest_checkpoint(prepared: Path, tmp_path: Path) -> None:
    over = {"ray.max_failures": 1, "train.total_steps": 16, "tracking.enabled": False}
    done, run_dir = _run_and_kill(tmp_path, prepared, "ray::RayTrainWorker", over)
    assert done.returncode == 0, done.stdout[-4000:]
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    assert list(ledger["step"]) == list(range(17)), "every step exactly once after the restart"
    log_text = (run_dir / "run.log").read_text()
    assert "resumed at step" in log_text, log_text[-3000:]
    assert log_text.count("built tiny") == 2, "the worker group restarted once, from the checkpoint"


def test_killed_agent_learner_is_recreated_from_the_checkpoint(prepared: Path, tmp_path: Path) -> None:
    over = {**AC_ODM, "train.total_steps": 16, "tracking.enabled": False}
    done, run_dir = _run_and_kill(tmp_path, prepared, "ray::Learner", over)
    assert done.returncode == 0, done.stdout[-4000:]
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    assert list(ledger["step"]) == list(range(17))
    assert "starting a new one from the last checkpoint" in (run_dir / "run.log").read_text()
    assert ledger["agent/restarts"].max() == 1


def test_more_workers_than_cpus_fails_fast_naming_the_shortfall(ray_session, prepared: Path, tmp_path: Path) -> None:
    from ray_jobs.train import run_train

    cfg = ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path, **{"ray.num_workers": 5}))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"5 workers x 0\.9 CPU"):
        run_train(cfg)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "t" / "ledger.parquet").exists()


def test_extending_a_wsd_run_under_ray_train(ray_session, prepared: Path, tmp_path: Path) -> None:
    """``--resume`` with a larger ``train.total_steps`` on the Ray Train path: Ray's record of the shorter run's
    checkpoints moves aside with them, so the worker group starts from the decay-start checkpoint."""
    from ray_jobs.train import run_train

    over = {**AC_ODM, "optim.schedule": "wsd", "optim.decay_fraction": 0.25, "checkpoint.keep_last": 1,
            "ray.num_workers": 1}
    run_train(ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path, **over, **{"train.total_steps": 8})))
    run_dir = tmp_path / "t"
    assert (run_dir / "stable" / "step_00000006").is_dir()
    longer = ExperimentConfig.from_dict(ray_experiment(prepared, tmp_path, **over, **{"train.total_steps": 12}))
    run_train(longer, resume=run_dir)
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    assert list(ledger["step"]) == list(range(13))
    assert "resumed at step 6" in (run_dir / "run.log").read_text()
    assert (run_dir / "previous" / "steps_8" / "checkpoint_manager_snapshot.json").exists()
    assert (run_dir / "previous" / "steps_8" / "checkpoints" / "step_00000008").is_dir()
    assert ledger["lr"].iloc[7:10].tolist() == [ledger["lr"].iloc[1]] * 3  # the peak LR until the new decay
