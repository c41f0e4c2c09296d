"""``acodm tune``: Ray Tune sweeps of a config's fields (ASHA, PBT or plain), tracked in MLflow, resumable.

``tune.param_space`` maps dotted config fields to a distribution: ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (inclusive), ``{choice: [...]}`` or ``{grid: [...]}``.
``check_sweep`` validates everything before Ray starts: every key is a config field, every distribution
is well formed, the config is valid at the ends of every range, at every choice and at the all-low and
all-high corners, the metric is one a trial reports, and the budget fits the scheduler.

Each trial is a short proxy pretraining run with its own agent: the trial function (the Tune trial,
0.01 CPU) builds the experiment's ``TorchTrainer`` (``ray_jobs.train.build_trainer``, the Train V2 way
of running trainers under Tune) and runs it in a thread, while a ``TuneForwarder`` callback hands every
Ray Train report to it through a one-slot Ray queue. The trial forwards the metrics to Tune with the
checkpoint attached (``tune.report(metrics, checkpoint=...)``), so Tune holds every trial's state:

* ASHA stops bad trials at its rungs (``time_attr="step"``: rungs at ``grace_period`` evaluations times
  powers of ``reduction_factor``, up to ``train.total_steps``);
* PBT clones a better trial's checkpoint (LM, optimizer, sampler, env, agent and ledger) into a worse
  trial and perturbs its agent hyperparameters (``PbtExplorer``, seeded, within the declared ranges);
* ``--resume`` (``Tuner.restore``) continues an interrupted sweep; finished trials are not re-run.

A trial that (re)starts from a Tune checkpoint always continues from it (``resume_from``), so a clone
or a resume is exact; each start is recorded in the trial's ``tune_events.jsonl``.

Layout of the experiment directory ``<output_dir>/<name>``: ``sweep.yaml`` (the sweep's config),
``tuner/`` (Tune's state and trial checkpoints), ``trials/<trial_id>/`` (each trial's run directory:
config, ledger, run.log, Ray Train checkpoints, events), ``results.parquet`` / ``results.csv`` (a row
per trial), ``plots/``, and ``best.yaml``: the best trial's complete config (named ``<name>-best``, no
``tune`` section) that ``acodm train best.yaml`` runs as is. MLflow gets a parent run per sweep and a
child run per trial (flattened params and metrics); the sweep's artifacts go on the parent.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
from ray import tune

from ray_jobs.config import (
    ConfigError,
    ExperimentConfig,
    field_exists,
    flatten,
    load_config,
    save_config,
    set_dotted,
)

log = logging.getLogger(__name__)

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SUMMARY_METRICS = ("val/mean_ppl", "val/weighted_ppl", "val/geo_mean_ppl")
RESERVED = ("name", "output_dir", "tune", "tracking")  # the sweep sets these per trial
# Agent fields PBT must not perturb: they fix the networks' or buffers' shapes (a clone could not load).
PBT_FIXED = ("agent.kind", "agent.mode", "agent.policy", "agent.weights", "agent.device", "agent.hidden_width",
             "agent.num_hidden_layers", "agent.num_critics", "agent.buffer_size")
PBT_RESAMPLE_PROBABILITY = 0.25
PBT_FACTORS = (0.8, 1.2)
TUNER_DIR, TRIALS_DIR, PLOTS_DIR = "tuner", "trials", "plots"
SWEEP_FILE, BEST_FILE, EVENTS_FILE = "sweep.yaml", "best.yaml", "tune_events.jsonl"
ORIGIN_FILE, STAGING_DIR = "tune_origin.json", ".tune-staging"
RESUME_MAY_DIFFER = ("ray.", "tracking.", "tune.trial_resources")
QUEUE_POLL_S = 0.5
ABORT_TIMEOUT_S = 60


# ============================================================================================ the space
@dataclass(frozen=True)
class ParamSpec:
    """One swept field: ``key`` (dotted), ``kind`` (one of ``KINDS``), ``values`` (bounds or options)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def domain(self) -> Any:
        """The Tune search-space object (``randint``'s upper bound is inclusive here, exclusive in Tune)."""
        lo, hi = (self.values + (None, None))[:2]
        return {
            "uniform": lambda: tune.uniform(lo, hi),
            "loguniform": lambda: tune.loguniform(lo, hi),
            "randint": lambda: tune.randint(lo, hi + 1),
            "choice": lambda: tune.choice(list(self.values)),
            "grid": lambda: tune.grid_search(list(self.values)),
        }[self.kind]()

    def edges(self) -> list[Any]:
        """The points checked before any trial: both ends of a range, every option of a list."""
        return list(self.values)

    def perturb(self, value: Any, rng: np.random.Generator) -> Any:
        """PBT's explore step: resample (probability 0.25) or scale by 0.8/1.2 (lists: shift one option),
        kept inside the declared range."""
        if self.kind not in RANGE_KINDS:
            options = list(self.values)
            if rng.random() < PBT_RESAMPLE_PROBABILITY or value not in options:
                return options[int(rng.integers(len(options)))]
            i = options.index(value) + int(rng.choice((-1, 1)))
            return options[min(max(i, 0), len(options) - 1)]
        lo, hi = self.values
        if rng.random() < PBT_RESAMPLE_PROBABILITY:
            if self.kind == "loguniform":
                return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            return int(rng.integers(lo, hi + 1)) if self.kind == "randint" else float(rng.uniform(lo, hi))
        scaled = min(max(float(value) * float(rng.choice(PBT_FACTORS)), lo), hi)
        return int(round(scaled)) if self.kind == "randint" else scaled


def _dotted_fields(model: Any = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted field name of the config (for 'did you mean' hints)."""
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields"):
            out.extend(_dotted_fields(info.annotation, f"{prefix}{name}."))
    return out


def _number(key: str, kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"tune.param_space[{key!r}].{kind}: bounds must be finite numbers, got {value!r}")
    return value


def parse_param_space(space: Mapping[str, Any]) -> list[ParamSpec]:
    """Parse and check ``tune.param_space``; errors name the key and say what is expected.

    Raises:
        ConfigError: empty space, unknown or reserved key, overlapping keys, malformed distribution,
            low >= high, loguniform low <= 0, non-integer randint bounds, empty list.
    """
    if not space:
        raise ConfigError("tune.param_space is empty: give at least one field to sweep, e.g. "
                          "agent.gamma: {uniform: [0.8, 0.99]}")
    specs = []
    for key, spec in space.items():
        if not isinstance(key, str) or not field_exists(key):
            hint = difflib.get_close_matches(str(key), _dotted_fields(), n=3)
            raise ConfigError(f"tune.param_space: {key!r} is not a config field"
                              + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
        if key.split(".")[0] in RESERVED:
            raise ConfigError(f"tune.param_space: {key!r} cannot be swept; the sweep sets {list(RESERVED)} itself")
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"tune.param_space[{key!r}] = {spec!r}: expected exactly one of "
                              f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}, "
                              f"{{choice: [v, ...]}}, {{grid: [v, ...]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"tune.param_space[{key!r}].{kind} must be a non-empty list, got {values!r}")
        if kind in RANGE_KINDS:
            if len(values) != 2:
                raise ConfigError(f"tune.param_space[{key!r}].{kind} must be [low, high], got {values!r}")
            lo, hi = (_number(key, kind, v) for v in values)
            if lo >= hi:
                raise ConfigError(f"tune.param_space[{key!r}].{kind}: low {lo!r} must be < high {hi!r}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"tune.param_space[{key!r}].loguniform: low must be > 0, got {lo!r}")
            if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
                raise ConfigError(f"tune.param_space[{key!r}].randint: bounds must be integers, got {values!r}")
            values = [int(lo), int(hi)] if kind == "randint" else [float(lo), float(hi)]
        specs.append(ParamSpec(key, kind, tuple(values)))
    keys = sorted(s.key for s in specs)
    for a, b in zip(keys, keys[1:], strict=False):
        if b.startswith(a + "."):
            raise ConfigError(f"tune.param_space sweeps both {a!r} and its field {b!r}; keep one")
    return specs


def reported_metrics(cfg: ExperimentConfig) -> list[str]:
    """The metric names every trial reports at each evaluation (``Pretrainer.evaluate``'s keys)."""
    per_domain = [f"val/{kind}/{d}" for d in cfg.data.domain_names for kind in ("loss", "ppl")]
    return [*SUMMARY_METRICS, *per_domain]


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samples) as Python scalars, so pydantic and YAML take them."""
    return value.item() if isinstance(value, np.generic) else value


def apply_params(data: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a config dict with dotted ``params`` set."""
    out = copy.deepcopy(data)
    for key, value in params.items():
        set_dotted(out, key, _plain(value))
    return out


def check_points(base: dict[str, Any], specs: Sequence[ParamSpec]) -> None:
    """Build the typed config at every edge point (each range's ends, each option, the all-low and
    all-high corners), so an out-of-range value fails before any trial starts."""
    points: list[tuple[str, dict[str, Any]]] = []
    for spec in specs:
        points += [(f"tune.param_space[{spec.key!r}] = {v!r}", {spec.key: v}) for v in spec.edges()]
    if len(specs) > 1:
        points.append(("every swept field at its first value", {s.key: s.values[0] for s in specs}))
        points.append(("every swept field at its last value", {s.key: s.values[-1] for s in specs}))
    for what, params in points:
        try:
            ExperimentConfig.from_dict(apply_params(base, params), source=what)
        except ConfigError as exc:
            raise ConfigError(f"{what} gives an invalid config:\n{exc}") from None


@dataclass(frozen=True)
class SweepPlan:
    """What ``check_sweep`` derived: the parsed space and the scheduler's step counts."""

    specs: tuple[ParamSpec, ...]
    population: int  # trials the search will create (num_samples x grid combinations)
    grace_steps: int  # ASHA: first rung, in optimiser steps
    perturb_steps: int  # PBT: steps between perturbations
    mutable: tuple[str, ...]  # PBT: keys the explorer perturbs


def check_sweep(cfg: ExperimentConfig) -> SweepPlan:
    """Validate a sweep completely before Ray starts; returns the plan.

    Raises:
        ConfigError: naming the field, the value and what is allowed.
    """
    t = cfg.tune
    if not cfg.ray.enabled or cfg.ray.num_workers < 1:
        raise ConfigError("acodm tune runs every trial as a Ray Train run: it needs ray.enabled: true and "
                          f"ray.num_workers >= 1 (got enabled={cfg.ray.enabled}, num_workers={cfg.ray.num_workers})")
    metrics = reported_metrics(cfg)
    if t.metric not in metrics:
        raise ConfigError(f"tune.metric {t.metric!r} is not reported by any trial; trials report {metrics}")
    specs = parse_param_space(t.param_space)
    base = trial_base(cfg)
    check_points(base, specs)
    ev, ck, total = cfg.eval.interval, cfg.checkpoint.interval, cfg.train.total_steps
    if ck % ev:
        raise ConfigError(f"checkpoint.interval={ck} must be a multiple of eval.interval={ev}: every "
                          f"checkpoint reported to Tune must carry tune.metric")
    grids = [s for s in specs if s.kind == "grid"]
    population = t.num_samples * math.prod(len(s.values) for s in grids)
    if t.search_alg == "optuna":
        if grids:
            raise ConfigError(f"search_alg optuna cannot sample grid entries ({[s.key for s in grids]}); "
                              f"use choice, or search_alg: random")
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("tune.search_alg 'optuna' needs the optional extra: pip install 'acodm[optuna]'")
    grace, perturb = t.grace_period * ev, t.perturbation_interval * ev
    if t.scheduler == "asha" and grace >= total:
        raise ConfigError(f"tune.grace_period={t.grace_period} evaluations x eval.interval={ev} = {grace} steps must "
                          f"be below train.total_steps={total}, or ASHA can never stop a trial")
    mutable = tuple(s.key for s in specs if s.key.startswith("agent.") and s.key not in PBT_FIXED)
    if t.scheduler == "pbt":
        if population < 2:
            raise ConfigError(f"PBT needs a population: tune.num_samples x grid sizes = {population}, need >= 2")
        if perturb >= total or perturb % ck:
            raise ConfigError(f"tune.perturbation_interval={t.perturbation_interval} evaluations x eval.interval="
                              f"{ev} = {perturb} steps must be below train.total_steps={total} and a multiple of "
                              f"checkpoint.interval={ck} (PBT clones a checkpoint at each perturbation)")
        if not mutable:
            raise ConfigError(f"PBT perturbs agent hyperparameters, but tune.param_space has none it may change "
                              f"(swept: {[s.key for s in specs]}; fixed by the networks' shapes: {list(PBT_FIXED)})")
    return SweepPlan(tuple(specs), population, grace, perturb, mutable)


def trial_base(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config dict trials start from: no ``tune`` section, local paths absolute (trials chdir)."""
    data = cfg.to_dict()
    data.pop("tune", None)
    root = Path.cwd()

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str((root / Path(path).expanduser()).resolve())

    data["output_dir"] = absolute(data["output_dir"])
    data["data"]["prepared_dir"] = absolute(data["data"]["prepared_dir"])
    data["data"]["tokenizer"]["path"] = absolute(data["data"]["tokenizer"]["path"])
    data["agent"]["policy"] = absolute(data["agent"]["policy"])
    data["ray"]["storage_path"] = absolute(data["ray"]["storage_path"])
    return data


def trial_config(base: dict[str, Any], params: Mapping[str, Any], *, trial_id: str, exp_dir: str,
                 sweep_name: str, tracking_uri: str | None) -> ExperimentConfig:
    """One trial's typed config: ``base`` with the trial's values, its run directory
    ``<exp_dir>/trials/<trial_id>``, and the sweep's MLflow store."""
    data = apply_params(base, params)
    data.update(name=trial_id, output_dir=str(Path(exp_dir) / TRIALS_DIR))
    data["tracking"]["run_name"] = f"{sweep_name}-{trial_id}"
    if tracking_uri is not None:
        data["tracking"]["mlflow_uri"] = tracking_uri
    return ExperimentConfig.from_dict(data, source=f"trial {trial_id} {dict(params)}")


class PbtExplorer:
    """PBT's explore step with its own seeded generator: perturbs each mutable agent hyperparameter of the
    cloned config (``ParamSpec.perturb``) and keeps a new value only if the typed config accepts it."""

    def __init__(self, base: dict[str, Any], specs: Sequence[ParamSpec], mutable: Sequence[str], seed: int) -> None:
        """``base`` is ``trial_base(cfg)``; ``mutable`` the keys to perturb."""
        self.base = base
        self.specs = [s for s in specs if s.key in mutable]
        self.all_keys = [s.key for s in specs]
        self.rng = np.random.default_rng(seed)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        """The perturbed copy of a clone source's config (Tune's ``custom_explore_fn``)."""
        new = dict(config)
        for spec in self.specs:
            candidate = {**new, spec.key: spec.perturb(_plain(new[spec.key]), self.rng)}
            params = {k: candidate[k] for k in self.all_keys if k in candidate}
            try:
                ExperimentConfig.from_dict(apply_params(self.base, params))
            except ConfigError as exc:
                log.warning("PBT: keeping %s=%r, the perturbed value is invalid: %s", spec.key, new[spec.key], exc)
                continue
            new = candidate
        return new


# ============================================================================================ trial side
class TrialEvents:
    """``<run_dir>/tune_events.jsonl``: one JSON line per start, resume, clone, report and end of a trial."""

    def __init__(self, run_dir: Path) -> None:
        """Append to ``run_dir``'s events file."""
        self.path = Path(run_dir) / EVENTS_FILE

    def write(self, event: str, **fields: Any) -> None:
        """Append one event with a timestamp."""
        line = json.dumps({"time": time.time(), "event": event, **fields}, default=_plain)
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
            staged = str(stage_checkpoint(checkpoint, Path(self.staging_dir) / f"step_{step:08d}", origin))
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
                     events: TrialEvents) -> Path | None:
    """Make a Tune checkpoint the one the trial's Ray Train run restores; None if it holds no state.

    The run's Ray Train storage is replaced by that one checkpoint, ``<run_dir>/checkpoints/step_<N>``,
    which the workers restore (``ray_jobs.train``: with no Ray Train checkpoint registered, the newest
    in the run's storage). Whatever Ray Train kept there is superseded: after a PBT clone it is another
    model's past, after a pause or ``--resume`` it is at most what Tune has.
    """
    from ray_jobs.driver import CKPT_DIR

    if not (local / "loop.json").exists():
        return None
    origin_file = local / ORIGIN_FILE
    origin = json.loads(origin_file.read_text()) if origin_file.exists() else {"trial_id": trial_id}
    step = int(json.loads((local / "loop.json").read_text())["step"])
    shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
    placed = copy_checkpoint(local, run_dir / CKPT_DIR / f"step_{step:08d}")
    if origin["trial_id"] != trial_id:
        events.write("clone", from_trial=origin["trial_id"], step=step, params=dict(params))
        log.info("PBT: trial %s continues from trial %s's checkpoint at step %d with %s",
                 trial_id, origin["trial_id"], step, dict(params))
    else:
        events.write("resume", step=step, params=dict(params))
    return placed


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
        self.params = {k: _plain(config[k]) for k in ctx.keys}
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
        self.restored = place_checkpoint(Path(checkpoint_dir), self.run_dir, self.trial_id, self.params,
                                         self.events)

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


# ============================================================================================ driver side
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
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # a report waits ~one poll (notes §3)
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
    (execution settings such as ``ray.*``, ``tracking.*``, ``tune.max_concurrent_trials`` may differ).
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
    metric, total = cfg.tune.metric, cfg.train.total_steps
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
    row.update({f"param/{k}": _plain(trial.config.get(k)) for k in keys})
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
