"""``acodm tune``: the param space and its checks (fast), and real ASHA / PBT / resumed sweeps (ray, slow).

The slow tests run tiny Ray Train trials (3 domains, a 0.12M-parameter LM, 8-16 steps) two at a time
on the session's 2-CPU Ray. Each asserts an outcome that depends on the mechanism, not on luck:
ASHA's grid puts two good learning rates first, so the two bad ones start only once a good one has
passed the first rung and are cut there; synchronous PBT ranks the whole population at step 8 and
must clone its best trial into its worst; the killed sweep's finished trial must not run again.
"""

from __future__ import annotations

import importlib.util
import json
import math
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

from ray_jobs.config import ConfigError, ExperimentConfig, load_config
from ray_jobs.tune import prepare_exp_dir, run_tune, write_best_config
from ray_jobs.tune_space import (
    ParamSpec,
    PbtExplorer,
    check_sweep,
    parse_param_space,
    reported_metrics,
    trial_base,
    trial_config,
)
from ray_jobs.tune_trial import TrialEvents
from tests.conftest import DOMAINS, experiment
from tests.ray_jobs.ray_helpers import stop_session

REPO = Path(__file__).resolve().parents[2]
GOOD_BAD_LR = [3e-3, 2e-3, 2e-5, 1e-5]  # grid order = trial order: two good LRs first, then two bad


def sweep(prepared: Path, out: Path, tune: dict, **over: object) -> dict:
    """A tiny sweep config dict: AC-ODM, 1 Ray Train worker per trial, an eval + checkpoint every 4 steps."""
    data = experiment(prepared, out, **{
        "name": "sweep", "train.total_steps": 8, "eval.interval": 4, "checkpoint.interval": 4,
        "agent.kind": "ac_odm", "agent.hidden_width": 16, "agent.num_hidden_layers": 1, "agent.batch_size": 4,
        "agent.warmup_fraction": 0.25, "ray.enabled": True, "ray.num_workers": 1,
        "ray.resources_per_worker": {"CPU": 0.9}, "tracking.enabled": True, **over,
    })
    data["tune"] = {"max_concurrent_trials": 2, **tune}
    return data


def config(prepared: Path, out: Path, tune: dict, **over: object) -> ExperimentConfig:
    return ExperimentConfig.from_dict(sweep(prepared, out, tune, **over))


# ================================================================================= the space (fast)
def test_parse_every_kind_and_tune_domains() -> None:
    specs = parse_param_space({
        "agent.gamma": {"uniform": [0.8, 0.99]},
        "agent.actor_lr": {"loguniform": [1e-5, 1e-3]},
        "agent.batch_size": {"randint": [4, 8]},
        "env.reward_mode": {"choice": ["mixture", "reference"]},
        "agent.tau": {"grid": [0.001, 0.01]},
    })
    assert specs == [
        ParamSpec("agent.gamma", "uniform", (0.8, 0.99)),
        ParamSpec("agent.actor_lr", "loguniform", (1e-5, 1e-3)),
        ParamSpec("agent.batch_size", "randint", (4, 8)),
        ParamSpec("env.reward_mode", "choice", ("mixture", "reference")),
        ParamSpec("agent.tau", "grid", (0.001, 0.01)),
    ]
    uniform, loguniform, randint, choice, grid = (s.domain() for s in specs)
    assert (uniform.lower, uniform.upper) == (0.8, 0.99)
    assert (loguniform.lower, loguniform.upper) == (1e-5, 1e-3)
    assert (randint.lower, randint.upper) == (4, 9)  # inclusive here, exclusive in Tune
    assert choice.categories == ["mixture", "reference"]
    assert grid == {"grid_search": [0.001, 0.01]}


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"'agent\.gama' is not a config field \(did you mean agent\.gamma"):
        parse_param_space({"agent.gama": {"uniform": [0.8, 0.9]}})


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"agent.gamma": {"uniform": [0.9, 0.9]}}, r"\['agent\.gamma'\]\.uniform: low 0\.9 must be < high 0\.9"),
        ({"agent.gamma": {"uniform": [0.99, 0.8]}}, r"low 0\.99 must be < high 0\.8"),
        ({"agent.actor_lr": {"loguniform": [0, 1e-3]}}, r"\['agent\.actor_lr'\]\.loguniform: low must be > 0"),
        ({"agent.batch_size": {"randint": [4, 8.5]}}, r"\['agent\.batch_size'\]\.randint: bounds must be integers"),
        ({"agent.gamma": {"uniform": [0.8, "x"]}}, r"\['agent\.gamma'\]\.uniform: bounds must be finite numbers"),
        ({"agent.gamma": {"uniform": [0.8, math.inf]}}, r"bounds must be finite numbers"),
        ({"agent.gamma": {"uniform": [0.8]}}, r"\['agent\.gamma'\]\.uniform must be \[low, high\]"),
        ({"agent.gamma": {"choice": []}}, r"\['agent\.gamma'\]\.choice must be a non-empty list"),
        ({"agent.gamma": {"normal": [0, 1]}}, r"\['agent\.gamma'\] = .*expected exactly one of"),
        ({"agent.gamma": {"uniform": [0.8, 0.9], "choice": [0.9]}}, r"expected exactly one of"),
        ({"name": {"choice": ["a", "b"]}}, r"'name' cannot be swept"),
        ({"tracking.mlflow_uri": {"choice": ["a"]}}, r"'tracking\.mlflow_uri' cannot be swept"),
        ({"agent.exploration": {"choice": [{}]}, "agent.exploration.scale": {"uniform": [0.1, 0.5]}},
         r"sweeps both 'agent\.exploration' and its field 'agent\.exploration\.scale'"),
        ({}, r"tune\.param_space is empty"),
    ],
)
def test_malformed_spaces_name_the_key(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_param_space(space)


def test_edge_points_go_through_the_typed_config(prepared: Path, tmp_path: Path) -> None:
    # gamma must be < 1: the high end of the range is checked before any trial
    cfg = config(prepared, tmp_path, {"param_space": {"agent.gamma": {"uniform": [0.9, 1.0]}}})
    with pytest.raises(ConfigError, match=r"tune\.param_space\['agent\.gamma'\] = 1\.0 gives an invalid config"):
        check_sweep(cfg)
    # each value alone is valid; together (the all-last corner) min_scale > scale is not
    cfg = config(prepared, tmp_path, {"param_space": {
        "agent.exploration.min_scale": {"choice": [0.01, 0.2]},
        "agent.exploration.scale": {"choice": [0.5, 0.1]},
    }})
    with pytest.raises(ConfigError, match=r"every swept field at its last value gives an invalid config"):
        check_sweep(cfg)


def test_metric_must_be_one_a_trial_reports(prepared: Path, tmp_path: Path) -> None:
    space = {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}}
    cfg = config(prepared, tmp_path, {**space, "metric": "val/ppl/delta"})
    with pytest.raises(ConfigError, match=r"tune\.metric 'val/ppl/delta' is not reported by any trial.*val/ppl/alpha"):
        check_sweep(cfg)
    assert "val/ppl/gamma" in reported_metrics(cfg) and "val/loss/beta" in reported_metrics(cfg)
    check_sweep(config(prepared, tmp_path, {**space, "metric": "val/ppl/alpha", "mode": "min"}))


@pytest.mark.parametrize(
    ("tune", "over", "message"),
    [
        ({}, {"checkpoint.interval": 6}, r"checkpoint\.interval=6 must be a multiple of eval\.interval=4"),
        ({"grace_period": 2}, {}, r"tune\.grace_period=2 evaluations .* = 8 steps must be below train\.total_steps=8"),
        ({"scheduler": "pbt", "num_samples": 1}, {}, r"PBT needs a population.*= 1, need >= 2"),
        ({"scheduler": "pbt", "perturbation_interval": 2}, {}, r"= 8 steps must be below train\.total_steps=8"),
        ({"scheduler": "pbt", "perturbation_interval": 1, "param_space": {"optim.lr": {"grid": [1e-3, 2e-3]}}}, {},
         r"PBT perturbs agent hyperparameters, but tune\.param_space has none"),
        ({"scheduler": "pbt", "perturbation_interval": 1, "param_space": {"agent.hidden_width": {"choice": [8, 16]}}},
         {}, r"has none it may change"),
        ({}, {"ray.num_workers": 0}, r"needs ray\.enabled: true and ray\.num_workers >= 1"),
        ({"search_alg": "optuna", "param_space": {"agent.tau": {"grid": [0.01, 0.1]}}}, {},
         r"optuna cannot sample grid entries \(\['agent\.tau'\]\)"),
    ],
)
def test_budget_and_scheduler_checks(prepared: Path, tmp_path: Path, tune: dict, over: dict, message: str) -> None:
    tune = {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}, "scheduler": "asha", **tune}
    with pytest.raises(ConfigError, match=message):
        check_sweep(config(prepared, tmp_path, tune, **over))


def test_optuna_without_the_extra_is_a_clear_error(prepared: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    cfg = config(prepared, tmp_path, {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}, "search_alg": "optuna"})
    with pytest.raises(ConfigError, match=r"needs the optional extra: pip install 'acodm\[optuna\]'"):
        check_sweep(cfg)


@pytest.mark.parametrize(
    "tune",
    [
        {"param_space": {"agent.gamm": {"uniform": [0.8, 0.9]}}},
        {"param_space": {"agent.gamma": {"uniform": [0.9, 0.8]}}},
        {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}, "metric": "val/accuracy"},
    ],
)
def test_run_tune_fails_before_ray_or_any_trial(prepared: Path, tmp_path: Path, tune: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import ray_jobs.cluster

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray must not start for a bad sweep")

    monkeypatch.setattr(ray_jobs.cluster, "connect", no_ray)
    with pytest.raises(ConfigError):
        run_tune(config(prepared, tmp_path, tune))
    assert not (tmp_path / "sweep").exists()


def test_pbt_explorer_is_seeded_stays_in_range_and_keeps_configs_valid(prepared: Path, tmp_path: Path) -> None:
    cfg = config(prepared, tmp_path, {"param_space": {}})
    specs = parse_param_space({
        "agent.gamma": {"uniform": [0.8, 0.99]},
        "agent.exploration.scale": {"uniform": [0.001, 0.5]},  # below min_scale=0.02 is invalid
        "agent.batch_size": {"randint": [2, 6]},
        "env.reward_mode": {"choice": ["mixture", "reference"]},
    })
    mutable = ("agent.gamma", "agent.exploration.scale", "agent.batch_size")
    runs = []
    for _ in range(2):
        explorer = PbtExplorer(trial_base(cfg), specs, mutable, seed=5)
        point = {"agent.gamma": 0.9, "agent.exploration.scale": 0.03, "agent.batch_size": 4, "env.reward_mode": "mixture"}
        seen = []
        for _ in range(60):
            point = explorer(point)
            seen.append(dict(point))
        runs.append(seen)
    assert runs[0] == runs[1]  # same seed, same perturbations
    seen = pd.DataFrame(runs[0])
    assert seen["agent.gamma"].between(0.8, 0.99).all() and seen["agent.gamma"].nunique() > 5
    assert seen["agent.exploration.scale"].ge(0.02).all()  # invalid perturbations were not kept
    assert all(type(p["agent.batch_size"]) is int for p in runs[0]) and seen["agent.batch_size"].between(2, 6).all()
    assert (seen["env.reward_mode"] == "mixture").all()  # not mutable: cloned as it is


def test_trial_config_and_best_yaml(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = sweep(prepared, tmp_path, {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}})
    data["data"]["prepared_dir"] = "rel/prepared"
    cfg = ExperimentConfig.from_dict(data)
    base = trial_base(cfg)
    assert "tune" not in base and base["data"]["prepared_dir"] == str(tmp_path / "rel" / "prepared")
    trial = trial_config(base, {"agent.gamma": np.float64(0.85)}, trial_id="abc_00001", exp_dir=str(tmp_path / "x"),
                         sweep_name="sweep", tracking_uri="sqlite:////tmp/m.db")
    assert trial.run_dir == tmp_path / "x" / "trials" / "abc_00001"
    assert trial.agent.gamma == 0.85 and trial.tracking.run_name == "sweep-abc_00001"
    assert trial.tracking.mlflow_uri == "sqlite:////tmp/m.db"
    assert trial.tune == ExperimentConfig.model_fields["tune"].default_factory()

    path = write_best_config(cfg, {"agent.gamma": 0.85}, tmp_path / "best.yaml", trial_id="abc_00001",
                             value=12.5, pbt=False)
    best = load_config(path)
    assert best.name == "sweep-best" and best.agent.gamma == 0.85
    assert best.data.prepared_dir == "rel/prepared"  # the user's paths as written
    assert best.tune.param_space == {} and "acodm train" in path.read_text().splitlines()[1]
    assert [p.name for p in tmp_path.glob("*best*")] == ["best.yaml"]


def test_experiment_directory_is_never_reused_silently(prepared: Path, tmp_path: Path) -> None:
    cfg = config(prepared, tmp_path, {"param_space": {"agent.gamma": {"uniform": [0.8, 0.9]}}})
    with pytest.raises(FileNotFoundError, match="no Tune sweep state"):
        prepare_exp_dir(cfg, tmp_path / "sweep")
    (tmp_path / "sweep" / "tuner").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"already holds a Tune sweep; continue it with .*--resume"):
        prepare_exp_dir(cfg, None)


def test_demo_sweep_config_is_valid() -> None:
    cfg = load_config(REPO / "configs" / "tune-demo.yaml")
    plan = check_sweep(cfg)
    assert cfg.tune.scheduler == "asha" and cfg.tune.num_samples == 4 and plan.population == 4
    assert cfg.data == load_config(REPO / "configs" / "demo.yaml").data  # the corpus `make demo` prepares
    # one trial (0.01 CPU + one 0.9-CPU worker) leaves room for a second on 2 CPUs
    assert cfg.ray.num_workers * cfg.ray.resources_per_worker["CPU"] + cfg.tune.trial_resources["CPU"] <= 1


# ================================================================================= real sweeps (ray)
def results(exp_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(exp_dir / "results.parquet")
    csv = pd.read_csv(exp_dir / "results.csv", dtype=str, keep_default_na=False)  # the same table
    assert list(csv.columns) == list(frame.columns)
    assert csv["trial_id"].tolist() == frame["trial_id"].tolist() and csv["status"].tolist() == frame["status"].tolist()
    np.testing.assert_allclose(csv["final/val/mean_ppl"].astype(float), frame["final/val/mean_ppl"])
    return frame


def ledger(run_dir: Path | str) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "ledger.parquet")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.heavy
def test_asha_sweep_stops_bad_trials_writes_best_and_tracks_mlflow(ray_session, prepared: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from ray_jobs.cli import main

    tune = {"param_space": {"optim.lr": {"grid": GOOD_BAD_LR}, "agent.gamma": {"uniform": [0.8, 0.99]}},
            "num_samples": 1, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2}
    cfg = config(prepared, tmp_path, tune)
    summary = run_tune(cfg)
    exp_dir = tmp_path / "sweep"
    frame = results(exp_dir)
    assert len(frame) == 4 and summary["num_trials"] == 4 and summary["num_errors"] == 0
    # The bad LRs start once a good trial has passed the rung at step 4, so ASHA must cut both there; the
    # first trial at the rung always goes on (the second good one goes on only if it beat the first).
    stopped = frame[frame["status"] == "early_stopped"]
    assert set(GOOD_BAD_LR[2:]) <= set(stopped["param/optim.lr"]) and (stopped["last_step"] == 4).all()
    completed = frame[frame["status"] == "completed"]
    assert 1 <= len(completed) and set(completed["param/optim.lr"]) <= set(GOOD_BAD_LR[:2])
    assert (completed["last_step"] == 8).all() and len(completed) + len(stopped) == 4
    for row in frame.itertuples():
        events = [e["event"] for e in TrialEvents(Path(row.run_dir)).read()]
        assert events[0] == "start" and events.count("start") == 1
        steps = ledger(row.run_dir)["step"].tolist()  # a stopped run may get past its last report
        assert steps == list(range(len(steps))) and len(steps) > row.last_step  # step 0: the untrained model
    assert all((Path(r) / "policy.pt").exists() for r in completed["run_dir"])

    best = load_config(exp_dir / "best.yaml")
    best_row = frame.loc[frame["trial_id"] == summary["best_trial"]].iloc[0]
    assert best_row["final/val/mean_ppl"] == completed["final/val/mean_ppl"].min()
    assert best.name == "sweep-best" and best.optim.lr == best_row["param/optim.lr"]
    assert best.agent.gamma == pytest.approx(best_row["param/agent.gamma"])
    assert (exp_dir / "plots" / "val_mean_ppl_vs_params.png").stat().st_size > 0

    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["tune/num_early_stopped"] == len(stopped)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best.yaml", "results.parquet", "plots"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(frame["mlflow_run_id"])
    for child in children:
        row = frame.loc[frame["mlflow_run_id"] == child.info.run_id].iloc[0]
        assert float(child.data.params["optim.lr"]) == row["param/optim.lr"]
        assert float(child.data.params["agent.gamma"]) == pytest.approx(row["param/agent.gamma"])
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val/mean_ppl")}
        assert history[row["last_step"]] == pytest.approx(row["final/val/mean_ppl"])  # a stopped run may go on a bit
        assert child.info.status == ("KILLED" if row["status"] == "early_stopped" else "FINISHED")

    # best.yaml is a complete config `acodm train` takes (in-process here: Ray Train runs are tested elsewhere)
    assert main(["train", str(exp_dir / "best.yaml"), "--set", "ray.enabled=false"]) == 0
    assert ledger(tmp_path / "sweep-best")["step"].tolist() == list(range(9))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.heavy
def test_pbt_clones_the_best_trials_checkpoint_into_the_worst(ray_session, prepared: Path, tmp_path: Path) -> None:
    tune = {"param_space": {"optim.lr": {"grid": GOOD_BAD_LR}, "agent.actor_lr": {"loguniform": [1e-4, 1e-2]}},
            "num_samples": 1, "scheduler": "pbt", "perturbation_interval": 2, "pbt_synch": True}
    cfg = config(prepared, tmp_path, tune, **{"train.total_steps": 12})
    summary = run_tune(cfg)
    frame = results(tmp_path / "sweep").set_index("trial_id")
    assert summary["num_completed"] == 4 and frame["clones"].sum() >= 1
    for trial_id, row in frame[frame["clones"] > 0].iterrows():
        events = TrialEvents(Path(row["run_dir"])).read()
        clone = next(e for e in events if e["event"] == "clone")
        source = frame.loc[clone["from_trial"]]
        assert clone["step"] == 8 and clone["from_trial"] != trial_id
        # the clone carries the source's LM (its LR came along) with a perturbed agent LR in range
        assert clone["params"]["optim.lr"] == source["param/optim.lr"] == row["param/optim.lr"]
        assert 1e-4 <= clone["params"]["agent.actor_lr"] <= 1e-2
        assert load_config(Path(row["run_dir"]) / "config.yaml").agent.actor_lr == clone["params"]["agent.actor_lr"]
        # state came from the checkpoint: the ledger rows to step 8 are the source's, then the run went on
        mine, theirs = ledger(row["run_dir"]), ledger(source["run_dir"])
        assert mine["step"].tolist() == list(range(13))
        cols = ["step", "loss"] + [f"weight/{d}" for d in DOMAINS]
        pd.testing.assert_frame_equal(mine[cols].iloc[:9], theirs[cols].iloc[:9])
        assert "resumed at step 8" in (Path(row["run_dir"]) / "run.log").read_text()
    # ranking at step 8 ranks the bad LRs last: a clone source always had a good LR
    sources = {e["from_trial"] for r in frame["run_dir"] for e in TrialEvents(Path(r)).read() if e["event"] == "clone"}
    assert set(frame.loc[list(sources), "param/optim.lr"]) <= set(GOOD_BAD_LR[:2])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.heavy
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_session, prepared: Path, tmp_path: Path) -> None:
    # one trial at a time: a short one (16 steps), then a long one (200) that the kill catches midway
    tune = {"param_space": {"train.total_steps": {"grid": [16, 200]}}, "num_samples": 1, "scheduler": "none",
            "max_concurrent_trials": 1}
    data = sweep(prepared, tmp_path, tune, **{"train.total_steps": 16, "eval.interval": 8, "checkpoint.interval": 8})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    exp_dir = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # Tune saves its experiment state every second
    log_file = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 - closed below
    driver = subprocess.Popen([sys.executable, "-m", "ray_jobs", "tune", str(path)], cwd=REPO, env=env,
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def events() -> list[list[dict]]:
        return [TrialEvents(p.parent).read() for p in sorted((exp_dir / "trials").glob("*/tune_events.jsonl"))]

    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and driver.poll() is None:
            now = events()
            if len(now) == 2 and any(e["event"] == "report" and e["checkpoint"] for e in now[1]):
                break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(3)  # let Tune save the running trial's checkpoint and its experiment state
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        stop_session(driver, grace_s=5)
        log_file.close()
    before = events()
    assert before[0][-1] == {**before[0][-1], "event": "end", "status": "completed"}
    assert before[1][-1]["event"] == "report", "the long trial ended before the kill"
    first, second = sorted(p.parent for p in (exp_dir / "trials").glob("*/tune_events.jsonl"))

    summary = run_tune(load_config(path), resume=exp_dir)
    frame = results(exp_dir)
    assert summary["num_completed"] == 2 and frame["last_step"].tolist() == [16, 200]
    assert TrialEvents(first).read() == before[0]  # finished before the kill: not run again
    # the interrupted trial continued from its checkpoint (Tune's, or Ray Train's if Tune had none yet)
    after = TrialEvents(second).read()[len(before[1]):]
    reported = [e["step"] for e in after if e["event"] == "report"]
    assert after[0]["event"] in ("resume", "start") and after[-1]["status"] == "completed"
    assert reported[0] > 8 and reported == list(range(int(reported[0]), 201, 8))
    assert "resumed at step" in (second / "run.log").read_text()
    assert ledger(second)["step"].tolist() == list(range(201))
    assert json.loads((exp_dir / "mlflow_run.json").read_text())["run_id"] == summary["parent_run_id"]
