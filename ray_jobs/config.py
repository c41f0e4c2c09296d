"""The experiment config: one typed, frozen model composed of every component's config.

Loading is strict: unknown keys, wrong types and out-of-range values are errors that name the dotted
field, the offending value and what is allowed (``ConfigError``). ``--set a.b=c`` overrides are parsed as
YAML scalars and applied before validation, so they obey the same rules. ``flatten`` turns a config into
dotted names for MLflow params and Tune spaces.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from agents.config import AgentConfig
from envs.config import LMConfig, PretrainConfig, StrictModel
from envs.paths import check_path_component, describe_missing_file


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field, the value and what is allowed."""


class RayConfig(StrictModel):
    """Where and how the run executes."""

    enabled: bool = Field(True, description="false = in-process debugging path, no Ray.")
    address: str | None = Field(None, description="Cluster address; null = RAY_ADDRESS or a local Ray.")
    num_workers: int = Field(2, ge=0, description="Ray Train LM workers (0 = in the driver process).")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    agent_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 0.0})
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts (-1 = unlimited).")
    storage_path: str | None = Field(None, description="Ray Train storage; null = the run's output_dir.")
    log_to_driver: bool = Field(
        False, description="true = Ray forwards every worker's and actor's output to the driver (Ray's default; "
        "for debugging). false = the driver shows rank 0's progress line and log records, and every rank's "
        "warnings; the full output stays in <run_dir>/run.log (rank 0) and Ray's session logs.",
    )


class TrackingConfig(StrictModel):
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True
    mlflow_uri: str | None = Field(None, description="null = sqlite:///<output_dir>/mlflow.db")
    experiment_name: str = "acodm"
    run_name: str | None = Field(None, description="null = the experiment config's name.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="MLflow run tags; 'method' names the run's method in `acodm report`."
    )
    system_metrics: bool = Field(
        True, description="Log MLflow system metrics (CPU, memory, disk, network; GPU when present) of rank 0's node."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak dense TFLOP/s of one accelerator at the training precision, for the "
        "perf/mfu metric; null = known GPUs by name (A100, H100, H200, L4, L40S, A10G), none on CPU.",
    )


class CheckpointConfig(StrictModel):
    """Exact-resume checkpoints."""

    interval: int = Field(50, gt=0, description="Checkpoint every N optimiser steps.")
    keep_last: int = Field(2, gt=0)


class ProxyConfig(StrictModel):
    """`acodm proxy`: train the agent with a small LM, then steer the target LM with it frozen."""

    lm: LMConfig = Field(default_factory=LMConfig)
    total_steps: int | None = Field(None, gt=0, description="Proxy budget; null = train.total_steps.")


class TuneConfig(StrictModel):
    """`acodm tune`: a Ray Tune sweep over dotted config fields (parsed and checked by ``ray_jobs.tune``)."""

    param_space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted field -> one of {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} "
        "(inclusive), {choice: [...]}, {grid: [...]}.",
    )
    num_samples: int = Field(4, gt=0)
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int = Field(2, gt=0)
    trial_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.01},
        description="The Tune trial's own resources (it only drives its Ray Train run, whose workers take "
        "ray.resources_per_worker).",
    )
    metric: str = "val/mean_ppl"
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, gt=0, description="ASHA: evaluations before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1)
    perturbation_interval: int = Field(2, gt=0, description="PBT: evaluations between perturbations.")
    pbt_synch: bool = Field(True, description="PBT: rank and perturb the whole population at once.")


class ExperimentConfig(PretrainConfig):
    """A whole experiment: the run the env needs (``envs.config.PretrainConfig``: seed, data, LM,
    optimiser, sampler, budget, eval, env) plus the agent, Ray, tracking, checkpoints, Tune and proxy."""

    name: str = Field("acodm", min_length=1, description="Run name: one path component (the run is <output_dir>/<name>).")
    output_dir: str = Field("runs", description="Run directories are <output_dir>/<name>.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("name")
    @classmethod
    def _single_component(cls, value: str) -> str:
        return check_path_component(value, "name")

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentConfig:
        names = self.data.domain_names
        k = len(names)
        if self.agent.weights is not None:
            unknown = sorted(set(self.agent.weights) - set(names))
            if unknown:
                raise ValueError(f"agent.weights names {unknown} that are not domains; domains are {names}")
            bad = {n: w for n, w in self.agent.weights.items() if not (math.isfinite(w) and w >= 0)}
            if bad:
                raise ValueError(f"agent.weights must be finite and >= 0; got {bad}")
            if sum(self.agent.weights.values()) <= 0:
                raise ValueError("agent.weights must have a positive sum")
        world = max(1, self.ray.num_workers) if self.ray.enabled else 1
        per_step = world * self.sampler.grad_accum
        if self.sampler.min_per_domain * k > per_step:
            raise ValueError(
                f"sampler.min_per_domain={self.sampler.min_per_domain} x K={k} domains exceeds the {per_step} "
                f"micro-batches per step (workers {world} x sampler.grad_accum {self.sampler.grad_accum})"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory, ``<output_dir>/<name>``."""
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; ``from_dict(to_dict(c)) == c``."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> ExperimentConfig:
        """Validate a dict into a config, raising ``ConfigError`` with dotted field names."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: dotted.field = value: what is allowed``."""
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (not a field of this section)")
            continue
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {loc} = {shown}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is a YAML scalar/flow (``1e-3``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = 'a.b.c'``, creating sections that are absent."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted ``key=value`` overrides applied."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(out, key, value)
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(describe_missing_file(p, "config file", "a YAML file"))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


# Fields that older versions wrote and that no longer exist; a run directory's saved config may hold
# them (they never changed what a run trains), so resuming it drops them instead of failing.
RETIRED_FIELDS = ("ray.agent_async", "ray.agent_acting", "ray.report_interval", "tracking.log_interval")


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment strictly and apply ``--set`` overrides."""
    data = apply_overrides(load_yaml(path), overrides)
    return ExperimentConfig.from_dict(data, source=str(path))


def load_saved_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """A run directory's ``config.yaml``, written by this or an older version (``RETIRED_FIELDS``
    are dropped); anything else unknown is an error as in ``load_config``."""
    data = load_yaml(path)
    for dotted in RETIRED_FIELDS:
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return ExperimentConfig.from_dict(data, source=str(path))


def save_config(cfg: ExperimentConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, p)


def absolute_paths(cfg: ExperimentConfig, base: str | os.PathLike[str] | None = None) -> ExperimentConfig:
    """The config with its local filesystem paths made absolute (against ``base``, default the cwd).

    Ray Train V2 runs workers in another working directory, so every path a worker reads must be
    absolute: ``output_dir``, ``data.prepared_dir``, ``data.tokenizer.path``, local source paths,
    ``ray.storage_path`` (when local), ``agent.policy`` (when a local file) and a relative sqlite URI.
    """
    root = Path(base or os.getcwd())

    def fix(path: str | None) -> str | None:
        if path is None or "://" in path or path.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
            return path
        return str(path if Path(path).is_absolute() else (root / path))

    data = cfg.to_dict()
    data["output_dir"] = fix(data["output_dir"])
    data["data"]["prepared_dir"] = fix(data["data"]["prepared_dir"])
    data["data"]["tokenizer"]["path"] = fix(data["data"]["tokenizer"]["path"])
    for domain in data["data"]["domains"]:
        domain["source"]["paths"] = [fix(p) for p in domain["source"]["paths"]]
    data["ray"]["storage_path"] = fix(data["ray"]["storage_path"])
    data["agent"]["policy"] = fix(data["agent"]["policy"])
    uri = data["tracking"]["mlflow_uri"]
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["mlflow_uri"] = "sqlite:///" + str(root / uri[len("sqlite:///"):])
    return ExperimentConfig.from_dict(data)


def flatten(data: dict[str, Any] | StrictModel, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted names; lists stay values (``data.domains`` becomes one entry)."""
    if isinstance(data, StrictModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("weights", "resources_per_worker"):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def field_exists(dotted: str) -> bool:
    """True if ``dotted`` names a field (at any depth) of ``ExperimentConfig``."""
    model: Any = ExperimentConfig
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
    return True
