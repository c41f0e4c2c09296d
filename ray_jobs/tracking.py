"""Experiment tracking behind a small ``MetricsSink`` protocol: MLflow for runs, in-memory for tests.

Pure code returns metric dicts; the run loop hands them to a sink. Only rank 0 tracks: ``make_sink``
gives every other rank (and ``tracking.enabled: false``) a ``NullSink``.

``MLflowSink`` never makes the training step wait: ``log_metrics`` validates and hands the batch to
MLflow's own asynchronous logging (``MlflowClient.log_batch(..., synchronous=False)``: MLflow's queue
and worker threads write it; an HTTP store retries transient failures itself), and ``close`` waits for
every batch (``RunOperations.wait``) before it sets the run's status. MLflow writes each batch with one
store call; set ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` to have it merge the batches queued over
that many seconds into fewer calls. Params and tags are sent at once (so a bad tracking URI fails at the
start of a run, not at its end), artifacts too.

Paths are made absolute before anything is logged, because Ray Train workers and Tune trials change
directory: the default store is ``sqlite:////<abs output_dir>/mlflow.db`` and experiments created
for a local store get an absolute ``file://`` artifact location. Runs can nest (``parent_run_id``
sets MLflow's ``mlflow.parentRunId`` tag): the proxy pipeline and Tune sweeps are a parent run with a
child per stage or trial. With ``run_dir``, the run id is remembered in ``<run_dir>/mlflow_run.json``
so a restarted worker group or ``acodm train --resume`` continues the same MLflow run.

See the runs with ``mlflow ui --backend-store-uri sqlite:////abs/path/runs/mlflow.db``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ray_jobs.config import ExperimentConfig, flatten

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_ID_FILE = "mlflow_run.json"
PARENT_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
MANIFEST_TAG = "acodm.manifest_hash"
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description
# MLflow 3's UI opens an experiment on its GenAI (traces) view unless told its kind; this tag is what
# the UI reads (values in its ExperimentKind enum), so the experiment opens on the model-training view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TRACKED_BATCHES = 10_000  # metric batches whose outcome close() still checks
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what MLflow accepts in metric/param names


@runtime_checkable
class MetricsSink(Protocol):
    """Where a run's params, metrics, tags and artifacts go."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's parameters (e.g. the flattened config)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at an optimiser step; must not block on I/O."""
        ...

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file or directory into the run's artifacts."""
        ...

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (git commit, dataset manifest hash, ...)."""
        ...

    def close(self, status: str = "FINISHED") -> None:
        """Flush everything and mark the run FINISHED, FAILED or KILLED."""
        ...


def _check_status(status: str) -> str:
    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r} is not one of {list(RUN_STATUSES)}")
    return status


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"metric step must be an int >= 0, got {step!r}")
    return step


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty strings, got {key!r}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} = {value!r} is not a number") from None
    return out


class NullSink:
    """Accepts everything and records nothing (ranks other than 0, tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Ignored."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Ignored."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Ignored."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Ignored."""

    def close(self, status: str = "FINISHED") -> None:
        """Ignored (the status is still checked)."""
        _check_status(status)


class InMemorySink:
    """Keeps everything in dicts, for tests; enforces the same input rules as ``MLflowSink``."""

    def __init__(self, run_id: str = "in-memory") -> None:
        self.run_id: str | None = run_id
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.status: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Store stringified params; re-logging a key with a different value is an error (as in MLflow)."""
        self._check_open()
        for key, value in params_to_strings(params).items():
            if key in self.params and self.params[key] != value:
                raise ValueError(f"param {key!r} already logged as {self.params[key]!r}, not {value!r}")
            self.params[key] = value

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append ``(step, value)`` per metric."""
        self._check_open()
        step = _check_step(step)
        for key, value in _float_metrics(metrics).items():
            self.metrics.setdefault(key, []).append((step, value))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Record the path (it must exist)."""
        self._check_open()
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact {os.fspath(path)!r} does not exist")
        self.artifacts.append((os.fspath(path), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Store stringified tags."""
        self._check_open()
        self.tags.update({str(k): str(v) for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        """Record the final status (a second close keeps the first)."""
        _check_status(status)
        if self.status is None:
            self.status = status

    def history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` logged for ``key``."""
        return list(self.metrics.get(key, []))

    def _check_open(self) -> None:
        if self.status is not None:
            raise RuntimeError(f"sink {self.run_id!r} is closed ({self.status})")


# ---------------------------------------------------------------------------------------------- helpers
def mlflow_key(name: str) -> str:
    """``name`` with characters MLflow rejects in metric/param names (e.g. parentheses) replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", name)


def params_to_strings(params: Mapping[str, Any], max_len: int | None = None) -> dict[str, str]:
    """MLflow-ready params: valid keys, values as text (JSON for lists/dicts), cut to MLflow's length limit.

    A truncated value ends with ``...`` and is logged at WARNING; the full config is an artifact.
    """
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        limit = max_len if max_len is not None else (_param_limit() if len(text) > 500 else 500)
        if len(text) > limit:
            log.warning("param %s is %d characters; logged truncated to %d", key, len(text), limit)
            text = text[: limit - 3] + "..."
        out[mlflow_key(str(key))] = text
    return out


def _param_limit() -> int:
    """MLflow's limit on a param value's length (6000 in MLflow 3; importing mlflow takes seconds)."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:  # pragma: no cover - mlflow is a dependency; 500 is the oldest limit
        return 500
    return int(MAX_PARAM_VAL_LENGTH)


def resolve_tracking_uri(uri: str | None, output_dir: str | os.PathLike[str]) -> str:
    """The tracking URI with every local path made absolute (workers and trials change directory).

    None gives ``sqlite:////<abs output_dir>/mlflow.db``; ``sqlite:///rel.db`` and bare paths become
    absolute; ``http(s)://``, ``databricks`` and other remote URIs are returned unchanged.
    """
    if uri is None:
        root = Path(output_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and not path.startswith("/") and path != ":memory:":
            path = str(Path(path).resolve())
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
        return uri
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """True for stores on this machine's filesystem (sqlite files, ``file:`` stores)."""
    return uri.startswith(("sqlite:", "file:"))


def default_artifact_location(uri: str, output_dir: str | os.PathLike[str]) -> str | None:
    """``file://<abs output_dir>/mlartifacts`` for a local store; None lets a server choose."""
    if not is_local_store(uri):
        return None
    return (Path(output_dir).expanduser().resolve() / "mlartifacts").as_uri()


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """For an ``http(s)`` tracking URI, GET ``/health`` so a dead server fails in seconds, not retries.

    Raises:
        ConnectionError: naming the URI and the error.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            raise OSError(f"HTTP {resp.status}")
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the MLflow server at tracking.mlflow_uri {uri!r}: {exc}. Start it (`mlflow server "
            f"--host ...`) or unset tracking.mlflow_uri to log to a local SQLite store."
        ) from None


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) when absent.

    Call it in the driver before starting workers, so that experiments never get an artifact location
    relative to some worker's directory. Safe when two processes race to create it.

    Raises:
        ValueError: the experiment exists but is deleted.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created by someone else in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or choose "
            f"another tracking.experiment_name"
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:  # created before this tag was set, or by someone else
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout (e.g. inside a submitted Ray job)."""
    if cwd is None:
        cwd = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def manifest_hash(prepared_dir: str | os.PathLike[str]) -> str | None:
    """sha256 of ``<prepared_dir>/manifest.json`` (``PreparedCorpus.manifest_hash``), None if absent."""
    import hashlib

    path = Path(prepared_dir) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def default_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Tags every run carries when known: git commit and the prepared dataset's manifest hash."""
    tags = {}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    digest = manifest_hash(cfg.data.prepared_dir)
    if digest:
        tags[MANIFEST_TAG] = digest
    return tags


# ---------------------------------------------------------------------------------------------- MLflow
class MLflowSink:
    """One MLflow run; metrics go through MLflow's own asynchronous logging.

    Args:
        tracking_uri: where to log (made absolute by ``resolve_tracking_uri`` first).
        experiment_name: created when absent, with ``artifact_location``.
        run_name: the new run's name.
        run_id: continue this existing run instead of creating one (its status goes back to RUNNING).
        parent_run_id: make the new run a child of this one (MLflow's nested runs).
        tags: tags for the new run.
        artifact_location: for a newly created experiment; None lets the store choose.

    Raises:
        ConnectionError: an HTTP tracking server that does not answer ``/health``.
        ValueError: ``run_id`` unknown to the store, or a deleted experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        check_server(tracking_uri)  # before importing mlflow (seconds), so a dead server fails fast
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException as exc:
                raise ValueError(
                    f"MLflow run {run_id!r} not found in {tracking_uri}: {exc.message}"
                ) from None
            self._client.update_run(run_id, status="RUNNING")
            self.resumed = True
        else:
            experiment_id = ensure_experiment(self._client, experiment_name, artifact_location)
            run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            if parent_run_id is not None:
                run_tags[PARENT_TAG] = parent_run_id
            run = self._client.create_run(experiment_id, run_name=run_name, tags=run_tags)
            self.resumed = False
        self.run_id: str | None = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.run_name = run.info.run_name
        # MLflow's futures for the metric batches not yet waited for; the oldest are forgotten beyond
        # the bound (MLflow itself logs every batch that fails at ERROR), so memory stays bounded.
        self._pending: deque[Any] = deque(maxlen=MAX_TRACKED_BATCHES)
        self.failed_batches = 0
        self.status: str | None = None
        self._system: Any = None  # MLflow's SystemMetricsMonitor, from start_system_metrics

    # -- MetricsSink -----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Send params now, in batches of 100; on a resumed run, keys already logged are left as they are."""
        from mlflow.entities import Param

        self._check_open()
        strings = params_to_strings(params)
        if self.resumed:
            existing = self._client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in strings.items() if k in existing and existing[k] != v)
            if changed:
                log.warning("resumed MLflow run keeps its original values of params %s", changed)
            strings = {k: v for k, v in strings.items() if k not in existing}
        items = [Param(k, v) for k, v in strings.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Validate and hand the metrics to MLflow's asynchronous queue (never waits for the store)."""
        from mlflow.entities import Metric

        self._check_open()
        step = _check_step(step)
        now_ms = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now_ms, step) for k, v in _float_metrics(metrics).items()]
        if batch:
            self._pending.append(self._client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents now."""
        self._check_open()
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {os.fspath(path)!r} does not exist")
        if local.is_dir():
            self._client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(local), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Send tags now, in batches of 100."""
        from mlflow.entities import RunTag

        self._check_open()
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def flush(self) -> int:
        """Wait until every metric batch logged so far is written or has failed.

        Returns:
            How many of those batches failed (also added to ``failed_batches``); each failure was
            logged at ERROR by MLflow when it happened.
        """
        from mlflow.exceptions import MlflowException

        failed = 0
        while self._pending:
            try:
                self._pending.popleft().wait()
            except MlflowException:
                failed += 1
        self.failed_batches += failed
        return failed

    def start_system_metrics(self) -> None:
        """Sample this node's CPU, memory, disk and network (GPU when present) into the run's ``system/*``
        metrics from a background thread (MLflow's ``SystemMetricsMonitor``) until ``close``."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed,
                                                tracking_uri=self.tracking_uri)
            self._system.start()
        except Exception as exc:  # psutil missing, an unsupported platform: tracking goes on without them
            log.warning("no MLflow system metrics for run %s: %s", self.run_id, exc)

    def close(self, status: str = "FINISHED") -> None:
        """Flush the metrics and set the run's final status (idempotent)."""
        _check_status(status)
        if self.status is not None:
            return
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.flush()
        if self.failed_batches:
            log.error(
                "%d metric batches of MLflow run %s could not be written to %s and are missing from it",
                self.failed_batches,
                self.run_id,
                self.tracking_uri,
            )
        self._client.set_terminated(self.run_id, status)
        self.status = status

    def __enter__(self) -> MLflowSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _check_open(self) -> None:
        if self.status is not None:
            raise RuntimeError(f"MLflow run {self.run_id} is closed ({self.status})")


def _read_run_id(run_dir: Path, tracking_uri: str) -> str | None:
    path = run_dir / RUN_ID_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("tracking_uri") != tracking_uri:
        return None
    return data.get("run_id") or None


def _write_run_id(run_dir: Path, tracking_uri: str, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_ID_FILE}.tmp"
    tmp.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}))
    os.replace(tmp, run_dir / RUN_ID_FILE)


def prepare_tracking(cfg: ExperimentConfig) -> tuple[str, str]:
    """In the driver, before workers start: resolve the URI and create the experiment.

    Returns:
        ``(tracking_uri, experiment_id)``; pass the URI on to workers as it is (it is absolute).
    """
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir)
    check_server(uri)
    location = default_artifact_location(uri, cfg.output_dir)
    return uri, ensure_experiment(MlflowClient(tracking_uri=uri), cfg.tracking.experiment_name, location)


def make_sink(
    cfg: ExperimentConfig,
    rank: int,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_params: bool = True,
    tracking_uri: str | None = None,
) -> MetricsSink:
    """The sink for this process: an ``MLflowSink`` on rank 0 with tracking enabled, else a ``NullSink``.

    The new run gets the flattened config as params and ``default_tags``, ``tracking.tags`` and ``tags``. With
    ``run_dir``, the run recorded in ``<run_dir>/mlflow_run.json`` for the same tracking URI is
    continued whatever its status (a restarted worker group, ``--resume``, a finished run extended)
    as long as the store still has it and it is not deleted; else a new run is recorded there. (A run
    already at ``train.total_steps`` never gets here: ``driver.finished_result`` stops it first.)

    Args:
        cfg: the experiment.
        rank: this process's Ray Train world rank (0 in-process).
        run_dir: the run directory (remembers the MLflow run id).
        parent_run_id: nest the run under this one (proxy pipeline, Tune).
        run_name: default ``tracking.run_name`` or the experiment's ``name``.
        tags: extra tags.
        log_params: log the flattened config as params.
        tracking_uri: the URI the driver resolved (``prepare_tracking``); pass it inside Ray Train
            workers, which run in another directory (Train V2 chdirs them), so that a relative
            ``output_dir`` cannot point them at a different store.
    """
    if rank != 0 or not cfg.tracking.enabled:
        return NullSink()
    uri = tracking_uri or resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir)
    run_id = None
    tags = dict(tags or {})
    if run_dir is not None:
        run_id = _read_run_id(Path(run_dir), uri)
        if run_id is not None and not _resumable(uri, run_id):
            run_id = None
        if run_id is None and parent_run_id is None:  # an extended run nests under its shorter self
            parent_run_id, extension_tags = _extension_parent(Path(run_dir), uri)
            tags.update(extension_tags)
    sink = MLflowSink(
        uri,
        cfg.tracking.experiment_name,
        run_name=run_name or cfg.tracking.run_name or cfg.name,
        run_id=run_id,
        parent_run_id=parent_run_id,
        tags={**default_tags(cfg), **cfg.tracking.tags, **(tags or {})},
        artifact_location=default_artifact_location(uri, cfg.output_dir),
    )
    if run_dir is not None and not sink.resumed:
        _write_run_id(Path(run_dir), uri, sink.run_id)
    if sink.resumed:
        log.info("continuing MLflow run %s", sink.run_id)
        if tags:
            sink.set_tags(tags)
    if log_params:
        sink.log_params(flatten(cfg))
    if isinstance(sink, MLflowSink) and not sink.resumed:
        description = run_description(cfg)
        if "acodm.branch_step" in tags:
            description += (f" Extends the run's {tags['acodm.extends_steps']}-step version (the parent run) from "
                            f"its checkpoint at step {tags['acodm.branch_step']}: earlier steps are logged there.")
        sink.set_tags({DESCRIPTION_TAG: description})
        log_dataset_input(sink, cfg)
    if isinstance(sink, MLflowSink) and cfg.tracking.system_metrics:
        sink.start_system_metrics()
    return sink


def run_description(cfg: ExperimentConfig) -> str:
    """The run page's Description: what was trained, on what, steered by which mixer."""
    targets = [d.name for d in cfg.data.domains if d.target]
    others = [d.name for d in cfg.data.domains if not d.target]
    return (
        f"acodm run `{cfg.name}`: a `{cfg.lm.preset}` LM pretrained for {cfg.train.total_steps} steps "
        f"(seq_len {cfg.lm.seq_len}) on {len(cfg.data.domains)} domains of `{cfg.data.prepared_dir}`, the "
        f"mixture chosen online by `{cfg.agent.kind}`. Target domains (val/mean_ppl averages them): "
        f"{', '.join(targets)}" + (f"; not targets: {', '.join(others)}" if others else "") + ". "
        "Metrics are means over each logging interval; the ledger and config are artifacts."
    )


def log_dataset_input(sink: MLflowSink, cfg: ExperimentConfig) -> None:
    """Record the prepared corpus as the run's training dataset (name, manifest digest, source path)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = manifest_hash(cfg.data.prepared_dir)
    if digest is None:
        return
    path = Path(cfg.data.prepared_dir).expanduser().resolve()
    dataset = Dataset(name=path.name if path.name != "prepared" else f"{path.parent.name}/{path.name}",
                      digest=digest[:20], source_type="local", source=json.dumps({"uri": path.as_uri()}))
    sink._client.log_inputs(sink.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])])


def _extension_parent(run_dir: Path, tracking_uri: str) -> tuple[str | None, dict[str, str]]:
    """The MLflow run of the shorter run this one extends (``checkpoints._extend``), and tags saying so."""
    from ray_jobs.checkpoints import EXTENSION_FILE

    try:
        record = json.loads((run_dir / EXTENSION_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    tags = {"acodm.extends_steps": str(record.get("previous_total_steps")),
            "acodm.branch_step": str(record.get("branch_step"))}
    previous = record.get("previous_mlflow") or {}
    if previous.get("tracking_uri") != tracking_uri or not previous.get("run_id"):
        return None, tags
    if not _resumable(tracking_uri, previous["run_id"]):
        return None, tags
    return previous["run_id"], tags


def _resumable(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"
