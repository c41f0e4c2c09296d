"""Loading runs: directories (config.yaml + ledger.parquet), method labels, bad inputs, MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.runs import (
    derive_method,
    ledger_column,
    load_mlflow_runs,
    load_run,
    tokens_per_step,
    unflatten_params,
)
from ray_jobs.config import flatten


def test_load_run_reads_config_and_ledger(run_dirs):
    run = load_run(run_dirs["uniform"][1])
    assert (run.name, run.method, run.kind, run.seed) == ("uniform-s1", "uniform", "uniform", 1)
    assert run.domain_names == ["a", "b", "junk"]
    assert run.target_domains == ["a", "b"]
    assert run.is_uniform
    assert run.ledger["step"].tolist() == list(range(1, 41))
    assert run.ledger["val/mean_ppl"].dropna().tolist() == [110, 70, 45, 32]
    assert run.config["train"]["total_steps"] == 40


def _cfg(kind="ac_odm", mode="online", reward="mixture", obs="default", weights=None):
    agent = {"kind": kind, "mode": mode}
    if weights is not None:
        agent["weights"] = weights
    return {"data": {"domains": [{"name": "a"}, {"name": "b"}, {"name": "junk", "target": False}]},
            "agent": agent, "env": {"reward_mode": reward, "observation_mode": obs}}


@pytest.mark.parametrize(
    ("cfg", "label"),
    [
        (_cfg("uniform"), "uniform"),
        (_cfg("natural"), "natural"),
        (_cfg("smoothed_mean"), "ODM"),
        (_cfg("exp3"), "EXP3"),
        (_cfg(), "AC-ODM (online)"),
        (_cfg(reward="reference"), "AC-ODM (reference reward)"),
        (_cfg(mode="frozen"), "AC-ODM (proxy)"),
        (_cfg(mode="frozen", reward="reference"), "AC-ODM (proxy, reference reward)"),
        (_cfg(obs="reference", reward="reference"), "AC-ODM (reference reward, reference observation)"),
        (_cfg("fixed", weights={"a": 2.0, "b": 2.0}), "fixed (a 0.5, b 0.5, junk 0)"),
    ],
)
def test_derived_method_labels(cfg, label):
    assert derive_method(cfg) == label


def test_method_tag_and_explicit_label_override_the_derived_one(run_dirs):
    run_dir = run_dirs["ac_odm"][0]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["tracking"]["tags"] = {"method": "AC-ODM tuned"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(run_dir).method == "AC-ODM tuned"
    assert load_run(run_dir, method="mine").method == "mine"
    assert load_run(run_dir).kind == "ac_odm"


def test_missing_inputs_name_the_file(tmp_path, run_dirs):
    with pytest.raises(FileNotFoundError, match="run directory .*nowhere.* does not exist"):
        load_run(tmp_path / "nowhere")
    run_dir = run_dirs["uniform"][0]
    (run_dir / "ledger.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"ledger\.parquet does not exist"):
        load_run(run_dir)
    (run_dir / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.yaml does not exist"):
        load_run(run_dir)


def test_corrupt_inputs_are_clear_errors(run_dirs):
    run_dir = run_dirs["uniform"][0]
    good_config = (run_dir / "config.yaml").read_text()
    (run_dir / "ledger.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"ledger\.parquet is not a readable parquet ledger"):
        load_run(run_dir)
    (run_dir / "config.yaml").write_text("name: [unclosed")
    with pytest.raises(ValueError, match=r"config\.yaml is not valid YAML"):
        load_run(run_dir)
    (run_dir / "config.yaml").write_text("- a list")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_run(run_dir)
    config = yaml.safe_load(good_config)
    del config["agent"]["kind"]
    other = run_dirs["uniform"][1]
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="agent.kind is missing"):
        load_run(other)


def test_bad_ledger_columns_and_repeated_steps(run_dirs):
    import pandas as pd

    run_dir = run_dirs["natural"][0]
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    ledger.drop(columns=["tokens"]).to_parquet(run_dir / "ledger.parquet")
    with pytest.raises(ValueError, match=r"lacks the columns \['tokens'\]"):
        load_run(run_dir)
    pd.concat([ledger, ledger.iloc[[3]]]).to_parquet(run_dir / "ledger.parquet")
    with pytest.raises(ValueError, match=r"repeats steps \[4\]"):
        load_run(run_dir)
    ledger.iloc[:0].to_parquet(run_dir / "ledger.parquet")
    with pytest.raises(ValueError, match="no rows"):
        load_run(run_dir)


def test_mlflow_metric_names_map_to_ledger_columns():
    assert ledger_column("mix/weight/code") == "weight/code"
    assert ledger_column("lm/loss/code") == "loss/code"
    assert ledger_column("lm/loss") == "loss"
    assert ledger_column("env/reward") == "reward"
    assert ledger_column("env/score/x") == "score/x"
    assert ledger_column("perf/step_s") == "time/step_s"
    assert ledger_column("val/ppl/code") == "val/ppl/code"
    assert ledger_column("agent/critic_loss") == "agent/critic_loss"


def test_unflatten_params_inverts_flatten_of_a_real_config(run_dirs):
    config = yaml.safe_load((run_dirs["uniform"][0] / "config.yaml").read_text())
    params = {k: str(v) for k, v in flatten(config).items()}  # MLflow stores str(value)
    back = unflatten_params(params)
    assert back["data"]["domains"] == config["data"]["domains"]
    assert back["agent"] == config["agent"]
    assert back["ray"]["resources_per_worker"] == config["ray"]["resources_per_worker"]
    assert tokens_per_step(back) == 1000


@pytest.mark.slow
def test_load_mlflow_runs_from_a_sqlite_store(run_dirs, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("synthetic", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_run(exp, run_name="parent")  # no metrics: skipped
    config = yaml.safe_load((run_dirs["ac_odm"][0] / "config.yaml").read_text())
    run = client.create_run(exp, run_name="ac-s0", tags={"method": "AC-ODM tagged"})
    rid = run.info.run_id
    for key, value in flatten(config).items():
        client.log_param(rid, key, value)
    for step, ppl in zip((10, 20, 30, 40), (80, 40, 28, 25), strict=True):
        client.log_metric(rid, "val/mean_ppl", ppl, step=step)
        client.log_metric(rid, "mix/weight/a", 0.5, step=step)
        client.log_metric(rid, "perf/step_s", 0.25, step=step)
    client.set_terminated(rid)
    runs = load_mlflow_runs(uri, "synthetic", run_status=None)
    assert len(runs) == 1
    loaded = runs[0]
    assert (loaded.name, loaded.method, loaded.kind, loaded.seed) == ("ac-s0", "AC-ODM tagged", "ac_odm", 0)
    assert loaded.domain_names == ["a", "b", "junk"] and loaded.target_domains == ["a", "b"]
    assert loaded.ledger["step"].tolist() == [10, 20, 30, 40]
    assert loaded.ledger["val/mean_ppl"].tolist() == [80, 40, 28, 25]
    assert loaded.ledger["weight/a"].tolist() == [0.5] * 4
    assert loaded.ledger["tokens"].tolist() == [10_000, 20_000, 30_000, 40_000]
    assert (loaded.ledger["wall_time"] >= 0).all()
    with pytest.raises(ValueError, match="experiment 'nope' not found"):
        load_mlflow_runs(uri, "nope")


def test_analysis_never_imports_ray_or_torch():
    code = ("import sys, analysis.runs, analysis.metrics, analysis.plots, analysis.report; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2], timeout=120)
    assert result.returncode == 0, result.stderr
