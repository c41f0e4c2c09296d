"""The in-process run loop: ledger, checkpoints, exact resume (also after SIGKILL), bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ray_jobs.allocator import ALLOCATOR_ENV
from ray_jobs.checkpoints import checkpoint_dirs, latest_checkpoint, load_checkpoint
from ray_jobs.config import ExperimentConfig, load_config
from ray_jobs.driver import run_local
from tests.conftest import DOMAINS, REPO, experiment


def read_ledger(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "ledger.parquet")


def test_static_run_writes_ledger_config_and_checkpoints(prepared: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path))
    result = run_local(cfg)
    run_dir = tmp_path / "t"
    ledger = read_ledger(run_dir)
    assert list(ledger["step"]) == list(range(0, 13))
    # step 0: the untrained model's evaluation only (curves start at the initial perplexity)
    initial = ledger.iloc[0]
    assert initial["tokens"] == 0 and np.isnan(initial["loss"]) and initial["val/mean_ppl"] > 0
    ledger = ledger.iloc[1:]
    # uniform mixer: every step's weights are uniform, micro-batch counts sum to the step's total
    weights = ledger[[f"weight/{d}" for d in DOMAINS]].to_numpy()
    np.testing.assert_allclose(weights, 1 / 3)
    counts = ledger[[f"microbatches/{d}" for d in DOMAINS]].to_numpy()
    assert (counts.sum(axis=1) == 3).all()
    assert (ledger["tokens"].diff().dropna() == 3 * 2 * 32).all()
    evaluated = ledger.dropna(subset=["val/mean_ppl"])
    assert list(evaluated["step"]) == [4, 8, 12]
    assert initial["val/mean_ppl"] > evaluated["val/mean_ppl"].iloc[-1]  # training lowered it
    assert np.isfinite(evaluated[[f"val/ppl/{d}" for d in DOMAINS]].to_numpy()).all()
    assert result["eval"]["val/mean_ppl"] == pytest.approx(evaluated["val/mean_ppl"].iloc[-1])
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000008", "step_00000012"]
    assert load_config(run_dir / "config.yaml") == cfg
    run_log = (run_dir / "run.log").read_text()
    assert run_log.count("checkpoint step") == 3
    # the progress line (stderr is not a terminal under pytest): plain records every log_interval (2) steps
    progress = [ln.split("ray_jobs.progress: ", 1)[1] for ln in run_log.splitlines() if "progress: train " in ln]
    assert [p.split()[1] for p in progress] == [f"{s}/12" for s in (2, 4, 6, 8, 10, 12)]
    assert re.fullmatch(r"train 12/12 \(100%\) \[\d\d:\d\d<00:00\], loss \d\.\d{3} \| [\d.]+k? tok/s \| "
                        r"reward [+-]\d\.\d{3} \| top alpha 0\.33 \| val/mean_ppl [\d.]+", progress[-1]), progress[-1]
    assert "\r" not in run_log and "\x1b" not in run_log


def test_resume_from_checkpoint_is_bit_identical(prepared: Path, tmp_path: Path) -> None:
    full = ExperimentConfig.from_dict(experiment(prepared, tmp_path / "a", **{"agent.kind": "natural"}))
    run_local(full)
    reference = read_ledger(tmp_path / "a" / "t")

    part_dir = tmp_path / "b"
    partial = ExperimentConfig.from_dict(
        experiment(prepared, part_dir, **{"agent.kind": "natural", "checkpoint.keep_last": 5})
    )
    run_local(partial)
    run_dir = part_dir / "t"
    # roll the run back to its step-4 checkpoint, as if it had died at step 6
    for ckpt in checkpoint_dirs(run_dir):
        if ckpt.name != "step_00000004":
            import shutil

            shutil.rmtree(ckpt)
    assert latest_checkpoint(run_dir).name == "step_00000004"
    run_local(partial)  # the run directory holds a checkpoint: resumes automatically
    resumed = read_ledger(run_dir)
    timing = [c for c in reference.columns if c.startswith("time/") or c == "wall_time"]
    pd.testing.assert_frame_equal(
        resumed.drop(columns=timing), reference.drop(columns=timing), check_exact=True
    )


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(
    prepared: Path, tmp_path: Path
) -> None:
    steps = 24
    over = {"train.total_steps": steps, "checkpoint.interval": 6, "eval.interval": 6}
    ref_cfg = experiment(prepared, tmp_path / "ref", **over)
    run_local(ExperimentConfig.from_dict(ref_cfg))
    reference = read_ledger(tmp_path / "ref" / "t")

    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(experiment(prepared, tmp_path / "kill", **over)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ray_jobs", "-q", "train", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    run_dir = tmp_path / "kill" / "t"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "step_00000006").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest_checkpoint(run_dir)
    assert killed_at is not None and int(killed_at.name[5:]) < steps
    # resume through the CLI, as a user would
    done = subprocess.run([*cmd[:-2], "train", str(cfg_path), "--resume", str(run_dir)], cwd=REPO, env=env)
    assert done.returncode == 0
    resumed = read_ledger(run_dir)
    assert list(resumed["step"]) == list(range(0, steps + 1))  # step 0 evaluated once, not again on resume
    timing = [c for c in reference.columns if c.startswith("time/") or c == "wall_time"]
    pd.testing.assert_frame_equal(
        resumed.drop(columns=timing), reference.drop(columns=timing), check_exact=True
    )


def test_resume_with_a_different_config_is_refused(prepared: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path, **{"train.total_steps": 4}))
    run_local(cfg)
    changed = ExperimentConfig.from_dict(
        experiment(prepared, tmp_path, **{"train.total_steps": 4, "optim.lr": 1e-3})
    )
    with pytest.raises(ValueError, match=r"optim\.lr"):
        run_local(changed)


def test_resume_needs_a_checkpoint(prepared: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path))
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        run_local(cfg, resume=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_local(cfg, resume=tmp_path / "empty")


def test_corrupt_checkpoint_is_a_clear_error(prepared: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path, **{"train.total_steps": 4}))
    run_local(cfg)
    ckpt = latest_checkpoint(tmp_path / "t")
    (ckpt / "pretrainer.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_checkpoint(ckpt)
    (ckpt / "loop.json").write_text("{oops")
    with pytest.raises(ValueError, match="loop.json"):
        load_checkpoint(ckpt)


def test_domains_differing_from_the_manifest_fail_before_training(prepared: Path, tmp_path: Path) -> None:
    data = experiment(prepared, tmp_path)
    data["data"]["domains"][2]["name"] = "delta"
    cfg = ExperimentConfig.from_dict(data)
    with pytest.raises(ValueError, match="delta"):
        run_local(cfg)
    assert not (tmp_path / "t" / "ledger.parquet").exists()


def test_allocator_env_stops_per_step_page_faults() -> None:
    # In child processes (glibc reads the settings at start): a thread (Ray Train runs the loop in one)
    # allocates and frees step-like arrays of 2-14 MiB, 20 times. glibc's default, self-adjusting
    # thresholds hand most of them fresh pages each time; with ALLOCATOR_ENV the heap is reused.
    code = """
import resource, threading
import numpy as np
def steps():
    for i in range(20):
        arrays = [np.ones((1 + (i + j) % 7) * 256 * 1024) for j in range(6)]
        del arrays
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for name, env in (("default", base), ("fixed", {**base, **ALLOCATOR_ENV})):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        faults[name] = int(out.stdout)
    assert faults["fixed"] < faults["default"] / 2, faults


def test_console_script_runs_again_with_the_allocator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import cli

    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append((exe, argv)))
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(sys, "argv", ["acodm", "train", "x.yaml"])
    for name in ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "123")  # a user's value is kept
    cli.console_main()
    assert calls == [(sys.executable, [sys.executable, "-m", "ray_jobs", "train", "x.yaml"])]
    assert os.environ["MALLOC_TOP_PAD_"] == "123"
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    calls.clear()
    assert cli.console_main() == 0 and calls == []  # the environment is complete: no second exec


@pytest.mark.slow
def test_running_a_finished_run_again_adds_no_mlflow_run(prepared: Path, tmp_path: Path) -> None:
    """A second ``acodm train`` of a finished run (a second ``make demo``) trains nothing and leaves MLflow
    as it was: same run count, same run id in ``mlflow_run.json``, no new metric values."""
    import sqlite3

    cfg = ExperimentConfig.from_dict(
        experiment(prepared, tmp_path, **{"train.total_steps": 4, "tracking.enabled": True})
    )
    first = run_local(cfg)
    run_dir = tmp_path / "t"
    db = tmp_path / "mlflow.db"

    def counts() -> tuple[int, int]:
        with sqlite3.connect(db) as con:
            return (con.execute("select count(*) from runs").fetchone()[0],
                    con.execute("select count(*) from metrics").fetchone()[0])

    before, run_id = counts(), (run_dir / "mlflow_run.json").read_text()
    # what the MLflow UI shows: model-training view, a description, the corpus as the dataset input
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(first_run_id := __import__("json").loads(run_id)["run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "acodm run `t`" in run.data.tags["mlflow.note.content"]
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert dataset.digest and str(prepared.resolve()) in dataset.source
    assert client.get_metric_history(first_run_id, "val/mean_ppl")[0].step == 0
    assert {"report/report.html", "report/report.md"} <= {a.path for a in client.list_artifacts(first_run_id, "report")}
    ledger = read_ledger(run_dir)
    assert before[0] == 1 and before[1] > 0
    again = run_local(cfg)
    assert counts() == before
    assert (run_dir / "mlflow_run.json").read_text() == run_id
    pd.testing.assert_frame_equal(read_ledger(run_dir), ledger)
    assert again["already_finished"] and again["eval"]["val/mean_ppl"] == first["eval"]["val/mean_ppl"]


def test_metrics_are_means_over_the_logging_interval(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    from ray_jobs.tracking import InMemorySink

    sink = InMemorySink()
    monkeypatch.setattr("ray_jobs.tracking.make_sink", lambda *a, **k: sink)
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path, **{"train.total_steps": 6, "train.log_interval": 3,
                                                                      "tracking.peak_tflops": 0.5}))
    run_local(cfg)
    ledger = read_ledger(tmp_path / "t").set_index("step")
    loss = sink.history("lm/loss")
    assert [s for s, _ in loss] == [3, 4, 6]  # every 3 steps and at the evaluation at step 4
    assert loss[0][1] == pytest.approx(ledger.loc[1:3, "loss"].mean())
    assert loss[1][1] == pytest.approx(ledger.loc[4, "loss"])
    assert loss[2][1] == pytest.approx(ledger.loc[5:6, "loss"].mean())
    assert sink.history("val/mean_ppl")[0] == (0, pytest.approx(ledger.loc[0, "val/mean_ppl"]))
    assert sink.history("data/tokens/alpha")[-1][1] == ledger["tokens/alpha"].sum()
    epochs = sink.history("data/epochs/alpha")[-1][1]
    assert 0 < epochs < ledger["tokens/alpha"].sum()  # a fraction of a pass over alpha's training tokens
    assert sink.history("mix/entropy")[0][1] == pytest.approx(np.log(3))  # uniform over 3 domains
    assert {"lm/grad_norm", "lm/lr", "lm/skipped_steps", "perf/tokens_per_s"} <= set(sink.metrics)
    # per-phase step timings, and the MFU estimate against the stated peak (none is known for a CPU)
    assert {"perf/data_s", "perf/forward_backward_s", "perf/probe_s", "perf/optimizer_s", "perf/agent_s"} <= set(sink.metrics)
    tflops, mfu = sink.history("perf/model_tflops"), sink.history("perf/mfu")
    assert [s for s, _ in mfu] == [3, 4, 6] and all(v > 0 for _, v in tflops)
    assert mfu[0][1] == pytest.approx(tflops[0][1] / 0.5)
