"""ray_jobs.tracking: sinks, MLflow over SQLite and over a real HTTP server, read back with MLflow's API."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest

from ray_jobs import tracking
from ray_jobs.config import flatten
from ray_jobs.tracking import (
    GIT_COMMIT_TAG,
    MANIFEST_TAG,
    PARENT_TAG,
    InMemorySink,
    MetricsSink,
    MLflowSink,
    NullSink,
    make_sink,
    params_to_strings,
    resolve_tracking_uri,
)
from tests.ray_jobs.ray_helpers import MlflowServer, free_port, tiny_config


# ----------------------------------------------------------------------------- pure helpers and sinks
def test_in_memory_sink_records_and_enforces_the_rules(tmp_path: Path) -> None:
    sink = InMemorySink()
    assert isinstance(sink, MetricsSink)
    sink.log_params({"a": 1, "b": [1, 2]})
    assert sink.params == {"a": "1", "b": "[1, 2]"}
    sink.log_params({"a": 1})  # same value again is fine
    with pytest.raises(ValueError, match="param 'a' already logged as '1', not '2'"):
        sink.log_params({"a": 2})
    sink.log_metrics({"lm/loss": 2.0}, step=1)
    sink.log_metrics({"lm/loss": 1.5}, step=2)
    assert sink.history("lm/loss") == [(1, 2.0), (2, 1.5)]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        sink.log_metrics({"x": 1.0}, step=-1)
    with pytest.raises(TypeError, match="metric 'x' = 'abc' is not a number"):
        sink.log_metrics({"x": "abc"}, step=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sink.log_artifact(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="run status 'DONE' is not one of"):
        sink.close("DONE")
    sink.close("FAILED")
    assert sink.status == "FAILED"
    with pytest.raises(RuntimeError, match="closed"):
        sink.log_metrics({"x": 1.0}, step=4)


def test_only_rank_zero_with_tracking_enabled_gets_a_real_sink(tmp_path: Path) -> None:
    assert isinstance(make_sink(tiny_config(tmp_path), rank=1), NullSink)
    assert isinstance(make_sink(tiny_config(tmp_path, tracking={"enabled": False}), rank=0), NullSink)
    assert not (tmp_path / "mlflow.db").exists()


def test_params_are_valid_mlflow_params() -> None:
    out = params_to_strings({"data.domains": [{"name": "a"}], "x(y)": None, "long": "z" * 600}, max_len=500)
    assert out["data.domains"] == '[{"name": "a"}]'
    assert out["x_y_"] == "null"
    assert len(out["long"]) == 500 and out["long"].endswith("...")


def test_tracking_uri_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, "runs").startswith("sqlite:////")
    assert resolve_tracking_uri("sqlite:///rel/m.db", "runs") == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db", "runs") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("mlruns", "runs") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("http://127.0.0.1:5000", "runs") == "http://127.0.0.1:5000"


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(
        ConnectionError, match=f"cannot reach the MLflow server at tracking.mlflow_uri '{uri}'"
    ):
        make_sink(tiny_config(tmp_path, tracking={"mlflow_uri": uri}), rank=0)
    assert time.monotonic() - start < 10


# ----------------------------------------------------------------------------- MLflow on SQLite
@pytest.fixture(scope="module")
def sqlite_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output_dir (and so one mlflow.db) for the module: creating the schema takes seconds."""
    return tmp_path_factory.mktemp("mlflow-sqlite")


def _read(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_sqlite_run_reads_back_with_mlflow(sqlite_root: Path) -> None:
    import mlflow

    prepared = sqlite_root / "prepared"
    prepared.mkdir(exist_ok=True)
    (prepared / "manifest.json").write_text('{"domains": []}')
    cfg = tiny_config(
        sqlite_root, name="sqlite-run", tracking={"experiment_name": "unit", "tags": {"method": "m"}}
    )
    run_dir = sqlite_root / "sqlite-run"
    artifact = sqlite_root / "config.yaml"
    artifact.write_text("name: sqlite-run\n")

    sink = make_sink(cfg, rank=0, run_dir=run_dir)
    for step in range(1, 31):
        sink.log_metrics({"lm/loss": 10.0 / step, "mix/weight/Wiki(en)": 0.5, "env/reward": -step}, step=step)
    sink.log_artifact(artifact)
    sink.close("FINISHED")

    uri = f"sqlite:///{sqlite_root / 'mlflow.db'}"
    client = _read(uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "sqlite-run"
    assert run.data.params["train.total_steps"] == str(cfg.train.total_steps)
    assert set(run.data.params) == {tracking.mlflow_key(k) for k in flatten(cfg)}
    assert run.data.tags[MANIFEST_TAG] == tracking.manifest_hash(prepared)
    assert len(run.data.tags.get(GIT_COMMIT_TAG, "0" * 40)) == 40
    history = client.get_metric_history(sink.run_id, "lm/loss")
    assert [(m.step, m.value) for m in history] == [(s, 10.0 / s) for s in range(1, 31)]
    assert client.get_metric_history(sink.run_id, "mix/weight/Wiki_en_")[-1].value == 0.5
    assert [a.path for a in client.list_artifacts(sink.run_id)] == ["config.yaml"]
    exp = client.get_experiment_by_name("unit")
    assert exp.artifact_location == (sqlite_root / "mlartifacts").resolve().as_uri()
    # search through the public API with the absolute URI
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_runs(experiment_names=["unit"], filter_string="tags.method = 'm'")
        assert list(found["run_id"]) == [sink.run_id]
        assert found["metrics.lm/loss"].iloc[0] == pytest.approx(10.0 / 30)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_log_metrics_never_waits_for_the_store(sqlite_root: Path) -> None:
    """A store that cannot be written (another connection holds SQLite's exclusive lock) does not stop
    log_metrics: had it written synchronously, it would wait for the lock (MLflow's busy timeout,
    20 s) and then fail with "database is locked"."""
    cfg = tiny_config(sqlite_root, name="busy-store", tracking={"experiment_name": "unit"})
    sink = make_sink(cfg, rank=0, log_params=False)
    db = sqlite3.connect(sqlite_root / "mlflow.db", isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")  # nobody else can read or write the store now
        for step in range(200):
            sink.log_metrics({f"m/{i}": float(step + i) for i in range(10)}, step=step)
        written = db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?", (sink.run_id,)).fetchone()
        assert written == (0,)  # all 200 calls returned while none of their metrics could be written
    finally:
        db.execute("COMMIT")
        db.close()
    sink.close()  # waits for MLflow's queue
    client = _read(sink.tracking_uri)
    history = client.get_metric_history(sink.run_id, "m/3")
    assert [(m.step, m.value) for m in history] == [(s, float(s + 3)) for s in range(200)]
    assert client.get_run(sink.run_id).info.status == "FINISHED" and sink.failed_batches == 0


@pytest.mark.slow
def test_async_metrics_all_arrive_after_close(tmp_path: Path) -> None:
    """Everything logged asynchronously is in the store once close() returns: many small batches, one
    batch larger than MLflow's 1000 metrics per call, and a NaN (e.g. an agent metric not defined yet)."""
    sink = make_sink(tiny_config(tmp_path, name="async", tracking={"experiment_name": "unit"}), rank=0)
    keys = [f"dom/{d}/loss" for d in range(20)]
    for step in range(1, 151):
        sink.log_metrics({k: step + i / 100 for i, k in enumerate(keys)}, step=step)
    sink.log_metrics({f"wide/{j}": float(j) for j in range(2500)}, step=151)
    sink.log_metrics({"agent/kl_to_prior": float("nan")}, step=151)
    sink.close()

    client = _read(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for i, key in enumerate(keys):
        history = client.get_metric_history(sink.run_id, key)
        assert [(m.step, m.value) for m in history] == [(s, s + i / 100) for s in range(1, 151)], key
    run = client.get_run(sink.run_id)
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("wide/")} == {
        f"wide/{j}": float(j) for j in range(2500)
    }
    assert math.isnan(run.data.metrics["agent/kl_to_prior"])
    assert run.info.status == "FINISHED" and sink.failed_batches == 0


@pytest.mark.slow
def test_failed_writes_are_counted_and_the_run_still_closes(sqlite_root: Path) -> None:
    """A batch the store rejects (here: the run was deleted meanwhile) is counted, not raised into the
    training step; the batches after it still arrive and close() sets the status."""
    sink = make_sink(tiny_config(sqlite_root, name="broken", tracking={"experiment_name": "unit"}), rank=0)
    client = _read(sink.tracking_uri)
    client.delete_run(sink.run_id)
    sink.log_metrics({"x": 1.0}, step=1)  # returns at once; the store rejects it in MLflow's thread
    assert sink.flush() == 1 and sink.failed_batches == 1
    client.restore_run(sink.run_id)
    sink.log_metrics({"x": 2.0}, step=2)
    sink.close("FAILED")
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "x")] == [(2, 2.0)]
    assert client.get_run(sink.run_id).info.status == "FAILED" and sink.failed_batches == 1
    with pytest.raises(RuntimeError, match="is closed"):
        sink.log_metrics({"x": 3.0}, step=3)


@pytest.mark.slow
def test_restarted_run_continues_the_same_mlflow_run(sqlite_root: Path) -> None:
    cfg = tiny_config(sqlite_root, name="resumed", tracking={"experiment_name": "unit"})
    run_dir = sqlite_root / "resumed"
    first = make_sink(cfg, rank=0, run_dir=run_dir)
    first.log_metrics({"lm/loss": 3.0}, step=1)
    first.close("FAILED")  # e.g. a worker died; Ray Train restarts the group
    second = make_sink(cfg, rank=0, run_dir=run_dir)
    assert second.run_id == first.run_id and second.resumed
    second.log_metrics({"lm/loss": 2.0}, step=2)
    second.close("FINISHED")
    client = _read(second.tracking_uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "lm/loss")] == [1, 2]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # a FINISHED run is continued too (e.g. extended with --resume), never replaced by a new run
    third = make_sink(cfg, rank=0, run_dir=run_dir)
    assert third.run_id == first.run_id and third.resumed
    third.close()
    named = client.search_runs([third.experiment_id], filter_string="attributes.run_name = 'resumed'")
    assert [r.info.run_id for r in named] == [first.run_id]


@pytest.mark.slow
def test_child_runs_are_nested_under_the_parent(sqlite_root: Path) -> None:
    cfg = tiny_config(sqlite_root, name="pipeline", tracking={"experiment_name": "unit"})
    parent = make_sink(cfg, rank=0, run_name="proxy-pipeline", log_params=False)
    # children as a Train worker makes them: another directory, the driver's resolved URI
    worker_cfg = tiny_config(sqlite_root / "elsewhere", name="pipeline", tracking={"experiment_name": "unit"})
    children = [
        make_sink(
            worker_cfg, rank=0, parent_run_id=parent.run_id, run_name=n, tracking_uri=parent.tracking_uri
        )
        for n in ("proxy", "target")
    ]
    for child in children:
        child.close()
    parent.close()
    client = _read(parent.tracking_uri)
    found = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'",
        order_by=["start_time"],
    )
    assert [r.info.run_name for r in found] == ["proxy", "target"]
    assert not (sqlite_root / "elsewhere" / "mlflow.db").exists()


# ----------------------------------------------------------------------------- a real MLflow server
@pytest.mark.slow
def test_http_server_run_reads_back(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg = tiny_config(
            tmp_path, name="http-run", tracking={"mlflow_uri": server.url, "experiment_name": "http"}
        )
        artifact = tmp_path / "ledger.txt"
        artifact.write_text("step,loss\n1,2.0\n")
        sink = make_sink(cfg, rank=0)
        assert isinstance(sink, MLflowSink)
        for step in range(1, 11):
            sink.log_metrics({"lm/loss": 1.0 / step, "perf/step_s": 0.1}, step=step)
        sink.log_artifact(artifact, artifact_path="ledger")
        sink.close()

        client = _read(server.url)
        run = client.get_run(sink.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["name"] == "http-run"
        assert [m.value for m in client.get_metric_history(sink.run_id, "lm/loss")] == [
            1.0 / s for s in range(1, 11)
        ]
        assert [a.path for a in client.list_artifacts(sink.run_id, "ledger")] == ["ledger/ledger.txt"]
        local = client.download_artifacts(sink.run_id, "ledger/ledger.txt", str(tmp_path / "dl"))
        assert Path(local).read_text() == artifact.read_text()
        assert str(server.artifact_root) in run.info.artifact_uri  # the server chose the location
    finally:
        server.stop()
