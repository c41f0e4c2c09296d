"""``acodm train`` on Ray: Ray Train LM workers (DDP), the agent as a Ray actor, MLflow on rank 0.

The driver validates everything that can fail fast (storage, cluster address, resources, MLflow), then
builds a ``TorchTrainer``. Each worker turns the config dict Ray hands it back into the typed
``ExperimentConfig`` on its first line and runs the same ``RunLoop`` as the in-process path, over an
LM-backed ``DataMixingEnv`` in DDP (gloo on CPU, NCCL on GPU). Rank 0 owns the agent (for AC-ODM a
learner actor and an acting copy, ``ray_jobs.agent_actor``, so the learner shares the worker group's
fate and is rebuilt with it from the checkpoint on a restart), acts, broadcasts the weights, and sends
the learner the transitions without waiting for its updates.

Checkpoints go to Ray Train storage as ``<run_dir>/checkpoints/step_<N>`` (the layout of
``docs/internals.md``), reported only at evaluation and checkpoint steps: one ``ray.train.report`` costs
about a controller poll (seconds on a small machine), so never every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ray_jobs.checkpoints import (
    CKPT_DIR,
    is_checkpoint_step,
    load_checkpoint,
    load_latest_checkpoint,
    prepare_run_dir,
    step_dir_name,
)
from ray_jobs.config import ExperimentConfig, absolute_paths
from ray_jobs.driver import (
    LoopHooks,
    RunLoop,
    add_file_log,
    build_env,
    build_local_mixer,
    finish_run,
    finished_result,
    mixer_kwargs,
    remove_file_log,
    resolve_policy,
    warn_about_reward_coverage,
)
from ray_jobs.progress import RelayedProgress, relay_logs, relay_to_driver
from ray_jobs.rundir import owns_run_dir

log = logging.getLogger(__name__)

# Ray Train V2 settings for a run on a local Ray (no ray.address / RAY_ADDRESS: started by ``connect``
# or by the caller on this machine). The preemption watcher is an actor that polls Ray for the draining
# of nodes (spot instances); a local Ray is this one machine and is never drained, so the watcher is
# only one more process waking up many times a second next to the training worker, and the source of
# an ERROR line in every run's log (benchmarks/RESULTS.md, "Overhead").
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# --------------------------------------------------------------------------------------------- worker side
class _DropReportEcho(logging.Filter):
    """Drops Ray Train V2's INFO line that echoes every ``ray.train.report`` with its whole metrics dict
    from every worker (dozens of lines of numbers per evaluation; the run's own log line has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def _quiet_report_echo() -> None:
    """Install ``_DropReportEcho`` on Ray Train's execution-context logger (an internal module: if it
    moves in another Ray version, the echo simply stays)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger) and not any(isinstance(f, _DropReportEcho) for f in logger.filters):
        logger.addFilter(_DropReportEcho())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the typed config first, then the shared run loop."""
    cfg = ExperimentConfig.from_dict(config["experiment"], source="train_loop_config")
    _quiet_report_echo()
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.lm.num_threads > 0:
        torch.set_num_threads(cfg.lm.num_threads)
    run_dir = Path(config["run_dir"])
    handler = add_file_log(run_dir) if rank == 0 else None
    relay = config.get("progress_relay")  # None: Ray forwards this worker's output (ray.log_to_driver)
    try:
        with relay_logs(relay, rank):
            _train_worker(cfg, config, run_dir, rank, world, relay)
    finally:
        if handler is not None:
            remove_file_log(handler)


def _train_worker(cfg: ExperimentConfig, config: dict[str, Any], run_dir: Path, rank: int, world: int,
                  relay: Any) -> None:
    """The body of ``train_loop_per_worker`` once its logging goes to ``run.log`` and the relay."""
    import torch

    from ray_jobs.tracking import make_sink

    # What can set this worker's step time apart from the in-process run's: Ray starts workers at
    # niceness 15 unless told otherwise (cluster.local_system_config), sets OMP_NUM_THREADS from the
    # worker's CPUs, and runs this function in a thread of its own (a separate malloc arena).
    log.info(
        "rank %d: pid %d, niceness %d, torch threads %d (inter-op %d), OMP_NUM_THREADS=%s, malloc mmap "
        "threshold %s", rank, os.getpid(), os.nice(0), torch.get_num_threads(),
        torch.get_num_interop_threads(), os.environ.get("OMP_NUM_THREADS", "unset"),
        os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc's default"),
    )
    env = build_env(cfg)
    mixer: Any = None
    sink: Any = None
    tmp_root = Path(tempfile.mkdtemp(prefix="acodm-ckpt-")) if rank == 0 else None
    status = "FAILED"
    try:
        if rank == 0:
            mixer = _make_mixer(cfg, env, run_dir)
            sink = make_sink(cfg, 0, run_dir=run_dir, parent_run_id=config.get("parent_run_id"),
                             tags=config.get("tags"))
        progress = (lambda total, initial, interval: RelayedProgress(relay, total, initial, interval)) \
            if relay is not None else None
        loop = RunLoop(cfg, env, mixer, run_dir, sink=sink, rank=rank, world_size=world,
                       hooks=LoopHooks(on_report=_reporter(cfg, run_dir), checkpoint_root=tmp_root, progress=progress))
        state = _restart_state(run_dir, rank)
        if state is not None:
            loop.restore(state)
        loop.run()
        if rank == 0:
            finish_run(cfg, run_dir, mixer, sink)
        status = "FINISHED"
    finally:
        if sink is not None:
            sink.close(status)
        if mixer is not None and hasattr(mixer, "close"):
            mixer.close()
        env.close()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)


def _restart_state(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """Where a (re)started worker group continues from.

    Ray Train's latest registered checkpoint first; else the newest complete checkpoint in the run's
    storage (a worker can die after its checkpoint was persisted but before Ray registered it, and a
    ``--resume`` run starts with none registered).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d))
        log.info("rank %d: restoring from Ray Train checkpoint %s", rank, ckpt.path)
        return state
    state = load_latest_checkpoint(run_dir)
    if state is not None:
        log.info("rank %d: restoring from checkpoint step %d in %s", rank, state["loop"]["step"], run_dir)
    return state


def _make_mixer(cfg: ExperimentConfig, env: Any, run_dir: Path) -> Any:
    """Rank 0's mixer: a learner actor plus an acting copy for a mixer with a policy network that
    learns (AC-ODM online, ``ray_jobs.agent_actor``); in-process for every other (bandits, greedy,
    static, a frozen policy), whose update is cheap or absent."""
    mixer = build_local_mixer(cfg, env, run_dir)
    if mixer.policy is None or cfg.agent.mode == "frozen":
        return mixer
    from ray_jobs.agent_actor import ActingMixer, LearnerSpec

    kwargs = mixer_kwargs(cfg, env)
    spec = LearnerSpec(
        agent_cfg=resolve_policy(cfg, run_dir),
        observation_space=kwargs.pop("observation_space"),
        action_space=kwargs.pop("action_space"),
        mixer_kwargs=kwargs,
        resources=dict(cfg.ray.agent_resources),
    )
    return ActingMixer(spec)


def _reporter(cfg: ExperimentConfig, run_dir: Path) -> Any:
    """``on_report`` hook: one collective ``ray.train.report`` per eval/checkpoint step."""
    import ray.train
    from ray.train import Checkpoint

    def on_report(step: int, metrics: dict[str, float], path: Path | None) -> None:
        checkpointing = is_checkpoint_step(cfg, step)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(path)) if path is not None else None,
            checkpoint_dir_name=step_dir_name(step) if checkpointing else None,
        )
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
            log.info("checkpoint step %d -> %s", step, run_dir / CKPT_DIR / step_dir_name(step))

    return on_report


# --------------------------------------------------------------------------------------------- driver side
def build_trainer(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    progress_relay: Any | None = None,
) -> Any:
    """A ``TorchTrainer`` for this experiment; its storage is ``<run_dir>/checkpoints``.

    ``progress_relay`` (from ``ray_jobs.progress.relay_to_driver``): where rank 0 sends its progress and
    log records for the driver to show; None = the workers log them, for Ray to forward.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_jobs.cluster import worker_resources

    scaling = ScalingConfig(
        num_workers=cfg.ray.num_workers,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker=worker_resources(cfg.ray.resources_per_worker, cfg.ray.use_gpu)
        if cfg.ray.num_workers > 0 else None,
    )
    run_config = RunConfig(
        name=CKPT_DIR,
        storage_path=str(Path(run_dir).resolve()),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        callbacks=callbacks,
    )
    loop_config = {
        "experiment": absolute_paths(cfg).to_dict(),  # workers run in another working directory
        "run_dir": str(Path(run_dir).resolve()),
        "resume_from": str(Path(resume_from).resolve()) if resume_from else None,
        "parent_run_id": parent_run_id,
        "tags": tags,
        "progress_relay": progress_relay,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
    )


@contextlib.contextmanager
def env_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Set the environment variables not already set, for the block only (an explicit setting wins).

    Ray Train V2 copies its ``RAY_TRAIN_*`` variables from the driver's environment to the controller
    and workers when ``fit`` starts them, so they must be set around ``fit``.
    """
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@owns_run_dir  # held by the driver: one `acodm train` per run directory (ray_jobs/rundir.py)
def run_train(
    cfg: ExperimentConfig,
    resume: Path | None = None,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one experiment on Ray (local or cluster); returns where the run, ledger and MLflow run are."""
    from ray_jobs.cluster import check_resources, check_storage, connect
    from ray_jobs.tracking import prepare_tracking, resolve_tracking_uri

    run_dir, ckpt = prepare_run_dir(cfg, resume)
    done = finished_result(cfg, run_dir, ckpt)
    if done is not None:  # nothing to train: no Ray, no MLflow run
        return done
    warn_about_reward_coverage(cfg)
    check_storage(str(run_dir.resolve()), field="output_dir")
    if cfg.ray.storage_path is not None:
        check_storage(cfg.ray.storage_path)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    start = time.perf_counter()
    # the dashboard's state API keeps Ray Train's placement-group cleaner quiet
    with connect(cfg, include_dashboard=True) as address:
        check_resources(cfg.ray.num_workers, cfg.ray.resources_per_worker, cfg.ray.use_gpu, cfg.ray.agent_resources)
        uri = prepare_tracking(cfg)[0] if cfg.tracking.enabled else None
        relayed = relay_to_driver() if not cfg.ray.log_to_driver else contextlib.nullcontext()
        with relayed as relay, env_defaults(LOCAL_TRAIN_ENV if address is None else {}):
            trainer = build_trainer(cfg, run_dir, resume_from=ckpt, parent_run_id=parent_run_id, tags=tags,
                                    progress_relay=relay)
            result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    summary = {
        "run_dir": str(run_dir),
        "ledger": str(run_dir / "ledger.parquet"),
        "metrics": dict(result.metrics or {}),
        "seconds": time.perf_counter() - start,
        "mlflow_uri": uri if uri is not None else resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir),
    }
    mean_ppl = summary["metrics"].get("val/mean_ppl")
    log.info(
        "run finished in %.0f s: %s%s", summary["seconds"], run_dir,
        f" (val/mean_ppl {mean_ppl:.3f})" if mean_ppl is not None and math.isfinite(mean_ppl) else "",
    )
    return summary
