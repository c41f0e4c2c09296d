"""Extending a finished run: ``acodm train --resume RUN_DIR`` with a larger ``train.total_steps`` under the
warmup-stable-decay schedule, and the rule for what may change (README, "Extending a run")."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.checkpoints import checkpoint_dirs
from ray_jobs.config import ExperimentConfig
from ray_jobs.driver import run_local
from tests.conftest import experiment

# 8 steps: decay from step 6 (25%); 12 steps: decay from step 9. Both have a one-step warmup, so the
# extended run must repeat, step for step, a 12-step run trained from the start.
WSD = {"optim.schedule": "wsd", "optim.decay_fraction": 0.25, "optim.warmup_fraction": 0.1,
       "checkpoint.interval": 4, "checkpoint.keep_last": 1, "agent.kind": "greedy"}
COMPARED = ["step", "tokens", "loss", "lr", "grad_norm", "reward", "val/mean_ppl"]


def config(prepared: Path, out: Path, total: int, **over: object) -> ExperimentConfig:
    return ExperimentConfig.from_dict(experiment(prepared, out, **{**WSD, "train.total_steps": total, **over}))


def ledger(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "ledger.parquet")


@pytest.mark.slow
def test_a_finished_wsd_run_extends_exactly_like_a_longer_run(prepared: Path, tmp_path: Path) -> None:
    import sqlite3

    from mlflow.tracking import MlflowClient

    short = config(prepared, tmp_path, 8, **{"tracking.enabled": True})
    run_local(short)
    run_dir = tmp_path / "t"
    assert [p.name for p in (run_dir / "stable").iterdir()] == ["step_00000006"]  # kept despite keep_last=1
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000008"]
    short_ledger = ledger(run_dir)
    first_mlflow = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

    extended = run_local(config(prepared, tmp_path, 12, **{"tracking.enabled": True}), resume=run_dir)
    assert extended["step"] == 12
    direct_dir = tmp_path / "direct"
    run_local(config(prepared, tmp_path, 12, name="direct"))

    got, want = ledger(run_dir), ledger(direct_dir)
    assert list(got["step"]) == list(range(13))  # each step once: 7-8 of the short run replaced
    pd.testing.assert_frame_equal(got[COMPARED], want[COMPARED])
    # nothing of the short run is lost: its decay, ledger, policy and MLflow run id are kept aside
    previous = run_dir / "previous" / "steps_8"
    assert [p.name for p in checkpoint_dirs(previous)] == ["step_00000008"]
    pd.testing.assert_frame_equal(ledger(previous), short_ledger)
    assert json.loads((previous / "mlflow_run.json").read_text())["run_id"] == first_mlflow
    # MLflow: the continuation is a new run nested under the short one, which is left as it was
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    second = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert second.info.run_id != first_mlflow
    assert second.data.tags["mlflow.parentRunId"] == first_mlflow
    assert second.data.params["train.total_steps"] == "12"
    assert "from its checkpoint at step 6" in second.data.tags["mlflow.note.content"]
    assert max(m.step for m in client.get_metric_history(first_mlflow, "lm/loss")) == 8
    assert min(m.step for m in client.get_metric_history(second.info.run_id, "lm/loss")) > 6
    # run again, it is finished: no MLflow run added
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        runs = con.execute("select count(*) from runs").fetchone()[0]
    assert run_local(config(prepared, tmp_path, 12, **{"tracking.enabled": True}), resume=run_dir)["already_finished"]
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("select count(*) from runs").fetchone()[0] == runs == 2


def test_extending_is_refused_for_cosine_runs_and_without_resume(prepared: Path, tmp_path: Path) -> None:
    cosine = ExperimentConfig.from_dict(experiment(prepared, tmp_path, **{"train.total_steps": 4}))
    run_local(cosine)
    longer = ExperimentConfig.from_dict(experiment(prepared, tmp_path, **{"train.total_steps": 8}))
    with pytest.raises(ValueError, match=r"optim.schedule='cosine'.*cannot be continued to 8 steps.*optim.schedule: wsd"):
        run_local(longer, resume=tmp_path / "t")

    run_local(config(prepared, tmp_path, 8, name="w"))
    with pytest.raises(ValueError, match=r"train.total_steps=8, not 12.*--resume"):
        run_local(config(prepared, tmp_path, 12, name="w"))  # same name, no --resume: not silently extended
    with pytest.raises(ValueError, match=r"differing fields: \['optim.lr', 'train.total_steps'\]"):
        run_local(config(prepared, tmp_path, 12, name="w", **{"optim.lr": 1e-3}), resume=tmp_path / "w")
    # the refusals changed nothing
    assert not (tmp_path / "w" / "previous").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path / "w")] == ["step_00000008"]


def test_a_run_without_a_checkpoint_before_the_decay_cannot_be_extended(prepared: Path, tmp_path: Path) -> None:
    """A run stopped by hand (or older than this feature) whose only checkpoint is inside its decay."""
    import shutil

    run_local(config(prepared, tmp_path, 8))
    shutil.rmtree(tmp_path / "t" / "stable")
    with pytest.raises(ValueError, match=r"no checkpoint from before step 6"):
        run_local(config(prepared, tmp_path, 12), resume=tmp_path / "t")
