"""One Tune trial: a short pretraining run on Ray Train with its own agent, reporting to Tune.

``AcodmTrial`` (a Tune class trainable taking 0.01 CPU) builds the experiment's ``TorchTrainer``
(``ray_jobs.train.build_trainer``: the Train V2 way of running trainers under Tune) and runs it in a
thread; a ``TuneForwarder`` callback in the Ray Train controller stages each reported checkpoint and
hands the report to the trial through a one-slot Ray queue. Each report is one Tune result, and a
report with a checkpoint asks Tune to save it, so Tune holds every trial's state (LM, optimizer,
sampler, env, agent, ledger) for ASHA, PBT clones and ``--resume``.

A trial that (re)starts from a Tune checkpoint continues exactly from it (``place_checkpoint``); each
start, resume, clone, report and end is a line of the trial's ``tune_events.jsonl``. A trial that Tune
stops or pauses aborts its Ray Train run first (``AcodmTrial.cleanup``): a controller killed with the
trial's actor would leave its placement group behind (Train V2's cleaner needs the State API, which
a Ray without the dashboard, or a machine with several Ray instances, does not give it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune

from ray_jobs.checkpoints import CKPT_DIR, step_dir_name
from ray_jobs.config import save_config
from ray_jobs.tune_space import plain, trial_config

log = logging.getLogger(__name__)

EVENTS_FILE = "tune_events.jsonl"
ORIGIN_FILE, STAGING_DIR = "tune_origin.json", ".tune-staging"
QUEUE_POLL_S = 0.5
ABORT_TIMEOUT_S = 60


class TrialEvents:
    """``<run_dir>/tune_events.jsonl``: one JSON line per start, resume, clone, report and end of a trial."""

    def __init__(self, run_dir: Path) -> None:
        """Append to ``run_dir``'s events file."""
        self.path = Path(run_dir) / EVENTS_FILE

    def write(self, event: str, **fields: Any) -> None:
        """Append one event with a timestamp."""
        line = json.dumps({"time": time.time(), "event": event, **fields}, default=plain)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every event so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """Copy a checkpoint directory (hard links on one filesystem: checkpoint files are never rewritten)."""
    shutil.copytree(src, dest, copy_function=_link_or_copy, dirs_exist_ok=True)
    return dest


def stage_checkpoint(checkpoint: Any, dest: Path, origin: Mapping[str, Any]) -> Path:
    """A local copy of a Ray Train checkpoint plus its origin record, written to ``dest`` atomically."""
    import pyarrow.fs as pafs

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem) and Path(checkpoint.path).is_dir():
        copy_checkpoint(Path(checkpoint.path), tmp)
    else:
        checkpoint.to_directory(str(tmp))
    (tmp / ORIGIN_FILE).write_text(json.dumps(dict(origin)))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


class TuneForwarder(ray.train.UserCallback):
    """Runs in the Ray Train controller: stages each reported checkpoint and hands rank 0's metrics, the
    staged path and the controller's handle to the Tune trial through a one-slot queue (so Train waits
    while the trial has not taken the previous report)."""

    def __init__(self, queue: Any, staging_dir: str, trial_id: str) -> None:
        """``queue`` is a ``ray.util.queue.Queue(maxsize=1)`` the trial reads."""
        self.queue = queue
        self.staging_dir = staging_dir
        self.trial_id = trial_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forward one report."""
        staged = None
        if checkpoint is not None:
            step = int(metrics[0].get("step", 0))
            origin = {"trial_id": self.trial_id, "step": step, "source": checkpoint.path}
            staged = str(stage_checkpoint(checkpoint, Path(self.staging_dir) / step_dir_name(step), origin))
        controller = ray.get_runtime_context().current_actor
        self.queue.put({"metrics": dict(metrics[0]), "checkpoint": staged, "controller": controller})


class _FitThread(threading.Thread):
    def __init__(self, trainer: Any) -> None:
        super().__init__(name="acodm-trial-fit", daemon=True)
        self.trainer = trainer
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # raised to Tune by the trial's next step
            self.error = exc


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver."""

    base: dict[str, Any]
    keys: tuple[str, ...]
    exp_dir: str
    sweep_name: str
    metric: str
    tracking_uri: str | None
    parent_run_id: str | None


def place_checkpoint(local: Path, run_dir: Path, trial_id: str, params: Mapping[str, Any],
                     events: TrialEvents) -> tuple[Path, str, int] | None:
    """Make a Tune checkpoint the one the trial's Ray Train run restores: returns where it was put, the
    trial it came from and its step; None if it holds no state.

    The run's Ray Train storage is replaced by that one checkpoint, ``<run_dir>/checkpoints/step_<N>``,
    which the workers restore (``ray_jobs.train``: with no Ray Train checkpoint registered, the newest
    in the run's storage). Whatever Ray Train kept there is superseded: after a PBT clone it is another
    model's past, after a pause or ``--resume`` it is at most what Tune has.
    """
    if not (local / "loop.json").exists():
        return None
    origin_file = local / ORIGIN_FILE
    origin = json.loads(origin_file.read_text()) if origin_file.exists() else {"trial_id": trial_id}
    step = int(json.loads((local / "loop.json").read_text())["step"])
    shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
    placed = copy_checkpoint(local, run_dir / CKPT_DIR / step_dir_name(step))
    if origin["trial_id"] != trial_id:
        events.write("clone", from_trial=origin["trial_id"], step=step, params=dict(params))
        log.info("PBT: trial %s continues from trial %s's checkpoint at step %d with %s",
                 trial_id, origin["trial_id"], step, dict(params))
    else:
        events.write("resume", step=step, params=dict(params))
    return placed, origin["trial_id"], step


class AcodmTrial(tune.Trainable):
    """One Tune trial: its own short pretraining run (Ray Train) with its own agent.

    ``setup`` validates the trial's config and writes its run directory; ``load_checkpoint`` (a resume or
    a PBT clone) puts the checkpoint in place; the first ``step`` starts the Ray Train run in a thread;
    each ``step`` returns one Ray Train report (``should_checkpoint`` when it carried a checkpoint, which
    ``save_checkpoint`` hands to Tune); the report at ``train.total_steps`` waits for the run's end
    (policy, artifacts) and is ``done``. ``cleanup`` (Tune stopping or pausing the trial) aborts the Ray
    Train run gracefully, so its placement group is freed before the trial's actor goes away.
    """

    def setup(self, config: dict[str, Any], ctx: SweepContext) -> None:
        """Validate the trial's config (a ``ConfigError`` fails the trial before any training)."""
        self.ctx = ctx
        self.params = {k: plain(config[k]) for k in ctx.keys}
        self.cfg = trial_config(ctx.base, self.params, trial_id=self.trial_id, exp_dir=ctx.exp_dir,
                                sweep_name=ctx.sweep_name, tracking_uri=ctx.tracking_uri)
        self.run_dir = self.cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        self.events = TrialEvents(self.run_dir)
        self.staging = self.run_dir / STAGING_DIR
        self.restored: Path | None = None
        self.fit: _FitThread | None = None
        self.queue: Any = None
        self.controller: Any = None
        self.staged: Path | None = None  # the checkpoint of the newest report taken
        self.last: dict[str, Any] | None = None
        self.status = "interrupted"  # until the run completes or fails

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Continue from a Tune checkpoint (this trial's own, or a better trial's after a PBT exploit)."""
        placed = place_checkpoint(Path(checkpoint_dir), self.run_dir, self.trial_id, self.params, self.events)
        if placed is not None:
            self.restored, source, step = placed
            if source != self.trial_id:
                self._record_clone(source, step)

    def _record_clone(self, source: str, step: int) -> None:
        """MLflow params never change, so a clone's new values go on the trial's run as ``tune/param/<key>``
        metrics at the clone's step and an ``acodm.tune.clone.step_<N>`` tag (the source trial, the values)."""
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_file = self.run_dir / "mlflow_run.json"
        if self.ctx.tracking_uri is None or not run_file.exists():
            return
        now = int(time.time() * 1000)
        metrics = [Metric(f"tune/param/{k}", float(v), now, step) for k, v in self.params.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)]
        tag = RunTag(f"acodm.tune.clone.step_{step}", json.dumps({"from_trial": source, "params": self.params}))
        try:
            run_id = json.loads(run_file.read_text())["run_id"]
            MlflowClient(tracking_uri=self.ctx.tracking_uri).log_batch(run_id, metrics=metrics, tags=[tag])
        except (MlflowException, KeyError, ValueError) as exc:
            log.warning("trial %s: could not record the clone in MLflow: %s", self.trial_id, exc)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Hand Tune the checkpoint of the newest report taken (nothing before the first one)."""
        if self.staged is not None:
            copy_checkpoint(self.staged, Path(checkpoint_dir))

    def step(self) -> dict[str, Any]:
        """The next Ray Train report, as Tune's result."""
        if self.fit is None:
            self._start()
        item = self._next_item()
        if item is None:  # the run ended without another report
            if self.fit.error is not None:
                self.status = "error"
                raise RuntimeError(f"trial {self.trial_id}: training failed: {self.fit.error}") from self.fit.error
            if self.last is None:
                raise RuntimeError(f"trial {self.trial_id}: the run ended without reporting {self.ctx.metric}")
            self.status = "completed"
            return {**self.last, "done": True}
        metrics, staged = dict(item["metrics"]), item["checkpoint"]
        self.controller, self.last = item["controller"], metrics
        self.events.write("report", step=metrics.get("step"), metric=metrics.get(self.ctx.metric),
                          checkpoint=staged is not None)
        result = dict(metrics)
        if staged is not None:
            if self.staged is not None:  # Tune saved it after the previous result
                shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = Path(staged)
            result["should_checkpoint"] = True
        if metrics.get("step", 0) >= self.cfg.train.total_steps:
            self.fit.join()  # the end of the run: policy, artifacts, MLflow status
            if self.fit.error is not None:
                self.status = "error"
                raise RuntimeError(f"trial {self.trial_id}: training failed: {self.fit.error}") from self.fit.error
            self.status = "completed"
            result["done"] = True
        return result

    def cleanup(self) -> None:
        """End the trial: abort a Ray Train run that is still going, record the end, drop staged copies."""
        try:
            self._abort_run()
        finally:
            self.events.write("end", status=self.status)
            shutil.rmtree(self.staging, ignore_errors=True)

    def _start(self) -> None:
        from ray.util.queue import Queue

        from ray_jobs.train import build_trainer

        if self.restored is None:
            self.events.write("start", params=self.params)
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        tags = {"acodm.tune.sweep": self.ctx.sweep_name, "acodm.tune.trial_id": self.trial_id}
        trainer = build_trainer(self.cfg, self.run_dir, resume_from=self.restored, tags=tags,
                                parent_run_id=self.ctx.parent_run_id,
                                callbacks=[TuneForwarder(self.queue, str(self.staging), self.trial_id)])
        self.fit = _FitThread(trainer)
        self.fit.start()

    def _next_item(self) -> dict[str, Any] | None:
        from ray.util.queue import Empty

        while True:
            try:
                return self.queue.get(timeout=QUEUE_POLL_S)
            except Empty:
                if self.fit.is_alive():
                    continue
            try:  # a report that raced with the end of the run (the queue holds at most one)
                return self.queue.get_nowait()
            except Empty:
                return None

    def _abort_run(self) -> None:
        """``TrainController.abort`` shuts the worker group down and frees its placement group (which
        would otherwise outlive a controller killed with this actor). The queue is drained meanwhile:
        the controller may be blocked handing over a report."""
        from ray.util.queue import Empty

        if self.fit is None or not self.fit.is_alive():
            return
        log.info("trial %s stopped by the scheduler: aborting its Ray Train run", self.trial_id)
        done = self.controller.abort.remote() if self.controller is not None else None
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        while self.fit.is_alive() and time.monotonic() < deadline:
            try:
                self.queue.get_nowait()
            except Empty:
                pass
            if done is not None and ray.wait([done], timeout=QUEUE_POLL_S)[0]:
                done = None
            self.fit.join(timeout=QUEUE_POLL_S)
        if self.fit.is_alive():
            log.warning("trial %s: its Ray Train run did not stop within %d s", self.trial_id, ABORT_TIMEOUT_S)


