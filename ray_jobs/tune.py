"""``acodm tune``: Ray Tune sweeps of a config's fields (ASHA, PBT or plain), tracked in MLflow, resumable.

``tune.param_space`` maps dotted config fields to a distribution: ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (inclusive), ``{choice: [...]}`` or ``{grid: [...]}``.
``check_sweep`` (``ray_jobs.tune_space``) validates everything before Ray starts: every key is a config
field, every distribution is well formed, the config is valid at the ends of every range, at every
choice and at the all-first and all-last corners, the metric is one a trial reports, and the budget
fits the scheduler.

Each trial (``ray_jobs.tune_trial.AcodmTrial``) is a short proxy pretraining run with its own agent,
on Ray Train, reporting every evaluation to Tune with its checkpoint:

* ASHA stops bad trials at its rungs (``time_attr="step"``: rungs at ``grace_period`` evaluations times
  powers of ``reduction_factor``, below ``train.total_steps``);
* PBT clones a better trial's checkpoint (LM, optimizer, sampler, env, agent, ledger) into a worse
  trial and perturbs its agent hyperparameters (``PbtExplorer``: seeded, inside the declared ranges,
  only values the typed config accepts);
* ``--resume`` (``Tuner.restore``) continues an interrupted sweep; finished trials are not re-run.

Layout of the experiment directory ``<output_dir>/<name>``: ``sweep.yaml`` (the sweep's config),
``tuner/`` (Tune's state and trial checkpoints), ``trials/<trial_id>/`` (each trial's run directory:
config, ledger, run.log, Ray Train checkpoints, events), ``results.parquet`` / ``results.csv`` (a row
per trial), ``plots/``, and ``best.yaml``: the best trial's complete config (named ``<name>-best``, no
``tune`` section) that ``acodm train best.yaml`` runs as is. MLflow gets a parent run per sweep and a
child run per trial (flattened params and metrics); the sweep's artifacts go on the parent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from ray_jobs.config import ConfigError, ExperimentConfig, flatten, load_config, save_config
from ray_jobs.tune_space import (
    TRIALS_DIR,
    ParamSpec,
    PbtExplorer,
    SweepPlan,
    apply_params,
    check_sweep,
    parse_param_space,
    plain,
    reported_metrics,
    trial_base,
    trial_config,
)
from ray_jobs.tune_trial import EVENTS_FILE, AcodmTrial, SweepContext, TrialEvents

__all__ = [
    "AcodmTrial", "ConfigError", "ParamSpec", "PbtExplorer", "SweepContext", "SweepPlan", "TrialEvents",
    "check_sweep", "parse_param_space", "prepare_exp_dir", "reported_metrics", "run_tune", "summarize",
    "trial_base", "trial_config", "write_best_config",
]

log = logging.getLogger(__name__)

TUNER_DIR, PLOTS_DIR = "tuner", "plots"
SWEEP_FILE, BEST_FILE = "sweep.yaml", "best.yaml"
RESUME_MAY_DIFFER = ("ray.", "tracking.", "tune.trial_resources")


def run_tune(cfg: ExperimentConfig, resume: Path | None = None) -> dict[str, Any]:
    """Run (or with ``resume``, continue) the sweep of ``cfg.tune``; returns where its outputs are.

    Everything that can fail fast (the space, the metric, the budget, the experiment directory, the
    cluster's room for one trial, MLflow) is checked before the first trial starts.

    Raises:
        ConfigError: a bad ``tune`` section (see ``check_sweep``).
        FileExistsError / FileNotFoundError: a new sweep over an existing one, or nothing to resume.
        ValueError: ``--resume`` with a config that differs from the sweep's.
        RuntimeError: every trial failed (the results table is still written).
    """
    from ray_jobs.cluster import connect
    from ray_jobs.tracking import make_sink, prepare_tracking

    plan = check_sweep(cfg)
    exp_dir = prepare_exp_dir(cfg, resume)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # a report waits ~one poll (Ray Train V2 polls its workers)
    start = time.perf_counter()
    with connect(cfg, include_dashboard=True):
        _check_trial_fits(cfg)
        uri = prepare_tracking(cfg)[0] if cfg.tracking.enabled else None
        parent = make_sink(cfg, 0, run_dir=exp_dir, run_name=cfg.tracking.run_name or cfg.name,
                           tags={"acodm.tune.role": "sweep"}, tracking_uri=uri)
        status = "FAILED"
        try:
            ctx = SweepContext(trial_base(cfg), tuple(s.key for s in plan.specs), str(exp_dir), cfg.name,
                               cfg.tune.metric, uri, parent.run_id)
            build_tuner(cfg, plan, ctx, exp_dir, resume=resume is not None).fit()
            summary = summarize(cfg, plan, exp_dir, uri)
            summary.update(parent_run_id=parent.run_id, mlflow_uri=uri, seconds=time.perf_counter() - start)
            _log_sweep(parent, summary)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            parent.close(status)
    if summary["num_trials"] and summary["num_errors"] == summary["num_trials"]:
        raise RuntimeError(f"every trial of the sweep failed; see {summary['results']} (first error: "
                           f"{summary['first_error']})")
    return summary


def prepare_exp_dir(cfg: ExperimentConfig, resume: Path | None) -> Path:
    """Create or check the experiment directory and record the sweep's config in ``sweep.yaml``.

    A new sweep never overwrites an existing one; ``--resume`` needs Tune's state and the same config
    (only execution settings may differ: ``ray.*``, ``tracking.*``, ``tune.trial_resources``).
    """
    from ray.tune import Tuner

    from ray_jobs.cluster import check_storage

    exp_dir = (Path(resume) if resume is not None else cfg.run_dir).resolve()
    tuner_dir = exp_dir / TUNER_DIR
    if resume is None and tuner_dir.exists():
        raise FileExistsError(f"{exp_dir} already holds a Tune sweep; continue it with `acodm tune CONFIG --resume "
                              f"{exp_dir}` or start another with a new name (--set name=...)")
    if resume is not None:
        if not Tuner.can_restore(str(tuner_dir)):
            raise FileNotFoundError(f"--resume {str(resume)!r}: no Tune sweep state in {tuner_dir}")
        saved = exp_dir / SWEEP_FILE
        if saved.exists():
            old, new = flatten(load_config(saved)), flatten(cfg)
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                            and not k.startswith(RESUME_MAY_DIFFER) and k not in ("name", "output_dir"))
            if differ:
                raise ValueError(f"--resume {str(resume)!r}: the sweep was started with a different config; "
                                 f"differing fields: {differ}")
    check_storage(str(exp_dir), field="output_dir")
    save_config(cfg, exp_dir / SWEEP_FILE)
    return exp_dir


def _check_trial_fits(cfg: ExperimentConfig) -> None:
    """One trial (its driver, its Train workers, its agent actor) must fit, or Ray would wait forever."""
    from ray_jobs.cluster import InsufficientResourcesError, check_resources

    extra = dict(cfg.ray.agent_resources)
    for name, value in cfg.tune.trial_resources.items():
        extra[name] = extra.get(name, 0.0) + value
    try:
        check_resources(cfg.ray.num_workers, cfg.ray.resources_per_worker, cfg.ray.use_gpu, extra)
    except InsufficientResourcesError as exc:
        raise InsufficientResourcesError(
            f"one Tune trial (tune.trial_resources plus its Ray Train run) does not fit: {exc}") from None


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def build_scheduler(cfg: ExperimentConfig, plan: SweepPlan) -> Any:
    """ASHA, PBT or FIFO; time is the LM's optimiser step (restored exactly by checkpoints and clones)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        # Trials that reach max_t end by themselves: stopping them there would kill their end-of-run work.
        return ASHAScheduler(time_attr="step", max_t=cfg.train.total_steps, grace_period=plan.grace_steps,
                             reduction_factor=t.reduction_factor, stop_last_trials=False)
    if t.scheduler == "pbt":
        log.info("PBT perturbs %s every %d steps", list(plan.mutable), plan.perturb_steps)
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=plan.perturb_steps, synch=t.pbt_synch,
            custom_explore_fn=PbtExplorer(trial_base(cfg), plan.specs, plan.mutable, cfg.seed),
        )
    return FIFOScheduler()


def build_search_alg(cfg: ExperimentConfig) -> Any:
    """Seeded random/grid search limited to ``max_concurrent_trials`` (Tune ignores its own limit for a
    given generator), or Optuna (TPE, from the optional extra; Tune wraps it in a concurrency limiter)."""
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # PBT needs its whole population to exist (Ray Train's placement groups then bound what runs at once).
    limit = 0 if cfg.tune.scheduler == "pbt" else cfg.tune.max_concurrent_trials
    return BasicVariantGenerator(max_concurrent=limit, random_state=cfg.seed)


def build_tuner(cfg: ExperimentConfig, plan: SweepPlan, ctx: SweepContext, exp_dir: Path, *, resume: bool) -> Any:
    """A new ``Tuner`` storing its state in ``<exp_dir>/tuner``, or the restored one (errored trials
    resume from their checkpoints; finished trials are kept as they are)."""
    trainable = tune.with_resources(tune.with_parameters(AcodmTrial, ctx=ctx), dict(cfg.tune.trial_resources))
    if resume:
        return tune.Tuner.restore(str(exp_dir / TUNER_DIR), trainable=trainable, resume_errored=True)
    t = cfg.tune
    # PBT may clone any trial's checkpoint from its last perturbation: keep them all (proxy runs are small).
    keep = None if t.scheduler == "pbt" else 2
    return tune.Tuner(
        trainable,
        param_space={s.key: s.domain() for s in plan.specs},
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=build_scheduler(cfg, plan),
            search_alg=build_search_alg(cfg),
            max_concurrent_trials=t.max_concurrent_trials if t.search_alg == "optuna" else None,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=TUNER_DIR, storage_path=str(exp_dir),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)),
    )


# ============================================================================================ results
def _trial_row(cfg: ExperimentConfig, trial: Any, history: Any, exp_dir: Path, keys: Sequence[str]) -> dict:
    """One row of the results table (see ``summarize``)."""
    metric, total = cfg.tune.metric, plain(trial.config.get("train.total_steps", cfg.train.total_steps))
    last = dict(trial.last_result or {})
    step = last.get("step")
    if trial.status == "ERROR":
        status = "error"
    elif trial.status != "TERMINATED":
        status = "unfinished"
    else:
        status = "completed" if step is not None and step >= total else "early_stopped"
    values = history[metric].dropna() if history is not None and metric in getattr(history, "columns", ()) else []
    best = (min(values) if cfg.tune.mode == "min" else max(values)) if len(values) else math.nan
    run_dir = exp_dir / TRIALS_DIR / trial.trial_id
    run_file = run_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text()).get("run_id") if run_file.exists() else None
    error = trial.get_error() if status == "error" else None
    row = {
        "trial_id": trial.trial_id, "status": status, "iterations": int(last.get("training_iteration", 0)),
        "last_step": int(step) if step is not None else 0,
        f"final/{metric}": float(last.get(metric, math.nan)), f"best/{metric}": float(best),
        "clones": sum(e["event"] == "clone" for e in TrialEvents(run_dir).read()),
        "run_dir": str(run_dir), "mlflow_run_id": run_id,
        "error": error.strip().splitlines()[-1] if error else None,
    }
    row.update({f"param/{k}": plain(trial.config.get(k)) for k in keys})
    return row


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def summarize(cfg: ExperimentConfig, plan: SweepPlan, exp_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
    """Write ``results.parquet`` / ``.csv`` (a row per trial: id, status, iterations, last step, final and
    best metric, clones, run directory, MLflow run, error, ``param/<key>``), the plots and ``best.yaml``;
    close the trials' MLflow runs that Tune stopped."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    keys = [s.key for s in plan.specs]
    metric, final = cfg.tune.metric, f"final/{cfg.tune.metric}"
    analysis = ExperimentAnalysis(str(exp_dir / TUNER_DIR))
    rows = [_trial_row(cfg, t, analysis.trial_dataframes.get(t.trial_id), exp_dir, keys) for t in analysis.trials]
    frame = pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)
    for col in [c for c in frame.columns if c.startswith("param/")]:  # parquet needs one type per column
        if frame[col].map(lambda v: isinstance(v, list | dict)).any():
            frame[col] = frame[col].map(json.dumps)
    _atomic_write(exp_dir / "results.parquet", lambda p: frame.to_parquet(p, index=False))
    _atomic_write(exp_dir / "results.csv", lambda p: frame.to_csv(p, index=False))
    counts = frame["status"].value_counts().to_dict()
    summary: dict[str, Any] = {
        "exp_dir": str(exp_dir), "results": str(exp_dir / "results.parquet"), "num_trials": len(frame),
        **{f"num_{s}": int(counts.get(s, 0)) for s in ("completed", "early_stopped", "unfinished")},
        "num_errors": int(counts.get("error", 0)), "best_trial": None, "best_config": None,
        "first_error": next(iter(frame["error"].dropna()), None),
    }
    if summary["num_unfinished"]:
        log.warning("the sweep was interrupted; continue it with: acodm tune CONFIG --resume %s", exp_dir)
    if tracking_uri is not None:
        _close_child_runs(tracking_uri, frame)
    scored = frame[np.isfinite(frame[final].astype(float))]
    _plot(scored, keys, metric, final, cfg.tune.mode, exp_dir / PLOTS_DIR)
    done = scored[scored["status"] == "completed"]
    pool = done if len(done) else scored
    if len(pool):
        best = pool.loc[pool[final].idxmin() if cfg.tune.mode == "min" else pool[final].idxmax()]
        params = {k: analysis.get_all_configs()[best["trial_id"]][k] for k in keys}
        path = write_best_config(cfg, params, exp_dir / BEST_FILE, trial_id=best["trial_id"], value=best[final],
                                 pbt=cfg.tune.scheduler == "pbt")
        summary.update(best_trial=best["trial_id"], best_config=str(path), best_params=params,
                       best_value=float(best[final]), best_run_id=best["mlflow_run_id"])
        log.info("best trial %s: %s = %.4f with %s; its config: %s (run it with `acodm train %s`)",
                 best["trial_id"], metric, best[final], params, path, path)
    log.info("sweep: %d trials (%d completed, %d early-stopped, %d errors); results in %s", len(frame),
             summary["num_completed"], summary["num_early_stopped"], summary["num_errors"], summary["results"])
    return summary


def write_best_config(cfg: ExperimentConfig, params: Mapping[str, Any], path: Path, *, trial_id: str,
                      value: float, pbt: bool) -> Path:
    """``best.yaml``: the sweep's config (the user's paths as written) with the best trial's values,
    named ``<name>-best``, without the ``tune`` section; validated before it is written (atomically)."""
    import yaml

    data = cfg.to_dict()
    data.pop("tune", None)
    data = apply_params(data, params)
    data["name"] = f"{cfg.name}-best"
    best = ExperimentConfig.from_dict(data, source=str(path))
    header = [f"# acodm tune {cfg.name}: trial {trial_id}, final {cfg.tune.metric} = {value:.6g}",
              f"# run it with: acodm train {path}"]
    if pbt:
        header.append(f"# PBT: the trial's final hyperparameters; its schedule is in trials/{trial_id}/{EVENTS_FILE}")
    text = "\n".join(header) + "\n" + yaml.safe_dump(best.to_dict(), sort_keys=False)
    _atomic_write(path, lambda p: p.write_text(text))
    return path


def _plot(scored: Any, keys: Sequence[str], metric: str, final: str, mode: str, out_dir: Path) -> None:
    """``plots/<metric>_vs_params.png``: the final metric against each swept field (``analysis.plots``)."""
    from analysis.plots import plot_sweep

    if scored.empty:
        log.warning("no trial reported %s: no sweep plot", metric)
        return
    frame = scored[[f"param/{k}" for k in keys]].rename(columns=lambda c: c[len("param/"):])
    frame[metric] = scored[final].astype(float)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_sweep(frame, out_dir / f"{metric.replace('/', '_')}_vs_params.png", metric=metric, params=list(keys),
               mode=mode)


def _close_child_runs(tracking_uri: str, frame: Any) -> None:
    """Tag each trial's MLflow run with its sweep status; end the runs Tune stopped mid-way (their workers
    were killed, so nobody else will): early-stopped -> KILLED, error -> FAILED."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ends = {"completed": "FINISHED", "early_stopped": "KILLED", "error": "FAILED"}
    for row in frame.itertuples():
        if not row.mlflow_run_id:
            continue
        try:
            client.set_tag(row.mlflow_run_id, "acodm.tune.status", row.status)
            status = client.get_run(row.mlflow_run_id).info.status
            if row.status in ends and (status == "RUNNING" or row.status == "early_stopped"):
                client.set_terminated(row.mlflow_run_id, ends[row.status])
        except MlflowException as exc:
            log.warning("could not close MLflow run %s of trial %s: %s", row.mlflow_run_id, row.trial_id, exc)


def _log_sweep(sink: Any, summary: Mapping[str, Any]) -> None:
    """Sweep counts, the best value and the sweep's files on the parent MLflow run."""
    exp_dir = Path(summary["exp_dir"])
    metrics = {f"tune/num_{s}": summary[f"num_{s}"] for s in ("trials", "completed", "early_stopped", "errors")}
    if summary.get("best_trial"):
        metrics["tune/best_value"] = summary["best_value"]
        sink.set_tags({"acodm.tune.best_trial": summary["best_trial"],
                       "acodm.tune.best_run_id": summary.get("best_run_id") or ""})
    sink.log_metrics(metrics, step=0)
    for name in (BEST_FILE, "results.parquet", "results.csv", SWEEP_FILE):
        if (exp_dir / name).exists():
            sink.log_artifact(exp_dir / name)
    if (exp_dir / PLOTS_DIR).is_dir():
        sink.log_artifact(exp_dir / PLOTS_DIR, PLOTS_DIR)
