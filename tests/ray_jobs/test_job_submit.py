"""``ray job submit`` against a head this test starts (and alone stops): the project's packages travel
with ``--working-dir`` to the job's driver and to its workers, and ``connect`` joins the job's cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.ray_jobs.ray_helpers import VENV_BIN, LocalRayHead, session_pids

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("envs", "agents", "ray_jobs", "analysis")

JOB_SCRIPT = """
import json
import ray
import agents, analysis, envs, ray_jobs
from ray_jobs.cluster import check_resources, connect, in_submitted_job
from ray_jobs.config import ExperimentConfig

cfg = ExperimentConfig.from_dict({"data": {"domains": [
    {"name": "a", "source": {"paths": ["a.jsonl"]}}, {"name": "b", "source": {"paths": ["b.jsonl"]}}]}})
assert in_submitted_job()
with connect(cfg) as address:
    asked = check_resources(1, {"CPU": 1.0}, False, {"CPU": 0.0})

    @ray.remote(num_cpus=0)
    def where():
        import ray_jobs
        return ray_jobs.__file__

    worker_file = ray.get(where.remote())
print("RESULT " + json.dumps({"address": address, "driver": ray_jobs.__file__, "worker": worker_file,
                              "cpus": ray.cluster_resources().get("CPU") if ray.is_initialized() else None,
                              "asked": asked}))
"""


def _working_dir(root: Path, experiment: dict | None = None) -> Path:
    """A small working dir: the project's top-level packages (sources only), the job script and,
    optionally, an experiment config ``exp.yaml``."""
    root.mkdir()
    for name in PACKAGES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "job_check.py").write_text(JOB_SCRIPT)
    if experiment is not None:
        import yaml

        (root / "exp.yaml").write_text(yaml.safe_dump(experiment))
    return root


def _ray_cli(head: LocalRayHead, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), "job", *args],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.ray
def test_job_submit_runs_the_project_on_a_private_head(tmp_path: Path, ray_session) -> None:
    from tests.conftest import DOMAINS, experiment
    from tests.envs.lm_fixtures import make_synthetic_corpus

    make_synthetic_corpus(tmp_path / "prepared", domain_names=DOMAINS, train_tokens=6000, val_tokens=1200)
    exp = experiment(tmp_path / "prepared", tmp_path / "runs", **{
        "ray.enabled": True, "ray.num_workers": 1, "ray.resources_per_worker": {"CPU": 0.9},
        "agent.kind": "ac_odm", "agent.hidden_width": 32, "agent.num_hidden_layers": 2, "agent.batch_size": 4,
        "train.total_steps": 8, "tracking.enabled": True, "tracking.experiment_name": "job-submit",
    })
    workdir = _working_dir(tmp_path / "wd", exp)
    submission_id = f"acodm-test-{uuid.uuid4().hex[:8]}"
    timings = {}
    start = time.monotonic()
    head = LocalRayHead(num_cpus=2)
    try:
        head.start()
        timings["head_start_s"] = time.monotonic() - start
        t0 = time.monotonic()
        submitted = _ray_cli(
            head,
            "submit",
            "--address", head.dashboard_url,
            "--submission-id", submission_id,
            "--working-dir", str(workdir),
            "--", "python", "job_check.py",
            timeout_s=300,
        )  # fmt: skip
        timings["submit_s"] = time.monotonic() - t0
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        from ray.job_submission import JobStatus, JobSubmissionClient

        assert JobSubmissionClient(head.dashboard_url).get_job_status(submission_id) == JobStatus.SUCCEEDED
        result_line = next(line for line in submitted.stdout.splitlines() if line.startswith("RESULT "))
        result = json.loads(result_line[len("RESULT ") :])
        # the real job: `acodm train` (as `python -m ray_jobs`, the packages travel with the working dir)
        t0 = time.monotonic()
        train_id = f"{submission_id}-train"
        trained = _ray_cli(
            head, "submit", "--address", head.dashboard_url, "--submission-id", train_id,
            "--working-dir", str(workdir), "--", "python", "-m", "ray_jobs", "train", "exp.yaml",
            timeout_s=600,
        )  # fmt: skip
        timings["train_job_s"] = time.monotonic() - t0
        assert trained.returncode == 0, trained.stdout[-4000:] + trained.stderr[-3000:]
        assert JobSubmissionClient(head.dashboard_url).get_job_status(train_id) == JobStatus.SUCCEEDED
    finally:
        t0 = time.monotonic()
        head.stop()
        timings["stop_s"] = time.monotonic() - t0
        timings["total_s"] = time.monotonic() - start
        print("job submit timings:", {k: round(v, 1) for k, v in timings.items()})

    # the job's driver and its worker imported the packages uploaded with --working-dir, not this checkout
    for key in ("driver", "worker"):
        assert not result[key].startswith(str(REPO) + os.sep), result
        assert "working_dir_files" in result[key] and str(head.temp_dir) in result[key], result
    assert result["address"] is not None  # the job supervisor's RAY_ADDRESS
    assert result["asked"] == {"CPU": 1.0}
    # the submitted training run is in MLflow, finished, with its metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("job-submit").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"val/mean_ppl", "env/reward", "agent/critic_loss"} <= set(run.data.metrics)
    # only this test's cluster is gone: its session is empty, the shared fixture's Ray still works
    assert head.proc is not None and session_pids(head.proc.pid) == []
    assert not head.temp_dir.exists()
    import ray

    assert ray.get(ray.remote(num_cpus=0)(lambda: 41 + 1).remote()) == 42
