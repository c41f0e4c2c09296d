"""The sweep's search space and every check that can run before Ray starts (no Ray imported here).

``tune.param_space`` maps dotted config fields to one distribution each: ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (inclusive), ``{choice: [...]}`` or ``{grid: [...]}``.
``check_sweep`` validates a sweep completely: every key is a config field, every distribution is well
formed, the typed config accepts the ends of every range, every option and the all-first and all-last
corners, the metric is one a trial reports, and the budget fits the scheduler. ``PbtExplorer`` is
PBT's explore step: seeded, inside the declared ranges, keeping only values the typed config accepts.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.config import ConfigError, ExperimentConfig, field_exists, set_dotted

log = logging.getLogger(__name__)

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SUMMARY_METRICS = ("val/mean_ppl", "val/weighted_ppl", "val/geo_mean_ppl")
RESERVED = ("name", "output_dir", "tune", "tracking")  # the sweep sets these per trial
# Agent fields PBT must not perturb: they fix the networks' or buffers' shapes (a clone could not load).
PBT_FIXED = ("agent.kind", "agent.mode", "agent.policy", "agent.weights", "agent.device", "agent.hidden_width",
             "agent.num_hidden_layers", "agent.num_critics", "agent.buffer_size", "agent.warmup_teacher")
PBT_RESAMPLE_PROBABILITY = 0.25
PBT_FACTORS = (0.8, 1.2)
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class ParamSpec:
    """One swept field: ``key`` (dotted), ``kind`` (one of ``KINDS``), ``values`` (bounds or options)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def domain(self) -> Any:
        """The Tune search-space object (``randint``'s upper bound is inclusive here, exclusive in Tune)."""
        from ray import tune

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


def plain(value: Any) -> Any:
    """numpy scalars (Tune's samples) as Python scalars, so pydantic and YAML take them."""
    return value.item() if isinstance(value, np.generic) else value


def apply_params(data: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a config dict with dotted ``params`` set."""
    out = copy.deepcopy(data)
    for key, value in params.items():
        set_dotted(out, key, plain(value))
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
        self.rng = np.random.default_rng([seed, 1])  # not the search's stream (seeded with `seed`)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        """The perturbed copy of a clone source's config (Tune's ``custom_explore_fn``)."""
        new = dict(config)
        for spec in self.specs:
            candidate = {**new, spec.key: spec.perturb(plain(new[spec.key]), self.rng)}
            params = {k: candidate[k] for k in self.all_keys if k in candidate}
            try:
                ExperimentConfig.from_dict(apply_params(self.base, params))
            except ConfigError as exc:
                log.warning("PBT: keeping %s=%r, the perturbed value is invalid: %s", spec.key, new[spec.key], exc)
                continue
            new = candidate
        return new


