"""Load experiments into one shape, ``Run``, from run directories or from an MLflow experiment.

A run directory (``docs/internals.md``, section "Ledger") holds ``config.yaml`` (the resolved
``ExperimentConfig``) and ``ledger.parquet`` (one row per optimiser step). An MLflow run holds the
flattened config as params (or ``config.yaml`` as an artifact), tags and metric histories. Both become a
``Run``: the config as a nested dict, the ledger as a DataFrame with the ledger's column names, and a
method label.

Method label rule (the first that applies):

1. an explicit label from the caller (``load_run(..., method=...)``, ``build_report(..., labels=...)``);
2. the ``method`` tag: ``tracking.tags.method`` in the config, or the MLflow run tag ``method``;
3. derived from the config (``derive_method``): ``uniform``, ``natural``, ``fixed (code 0.5, ...)``,
   ``ODM`` (smoothed mean), ``EXP3``, and for AC-ODM ``AC-ODM (online)``, ``AC-ODM (reference reward)``,
   ``AC-ODM (proxy)`` (``agent.mode: frozen``) or ``AC-ODM (proxy, reference reward)``.

Runs with the same label are seeds of one method. The uniform baseline is found by ``agent.kind``
(not by label), so relabelling it does not lose the baseline.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LEDGER_FILE = "ledger.parquet"
REQUIRED_LEDGER_COLUMNS = ("step", "tokens", "wall_time")

_SIMPLE_LABELS = {"uniform": "uniform", "natural": "natural", "smoothed_mean": "ODM", "exp3": "EXP3"}

# MLflow metric names (ray_jobs tracking) -> ledger column names; exact names first, then prefixes.
_MLFLOW_EXACT = {"lm/loss": "loss", "lm/lr": "lr", "env/reward": "reward", "perf/step_s": "time/step_s"}
_MLFLOW_PREFIX = {"lm/loss/": "loss/", "mix/weight/": "weight/", "env/score/": "score/",
                  "env/reward_part/": "reward_part/"}


@dataclass(frozen=True, eq=False)
class Run:
    """One training run: its resolved config, its per-step ledger and the method it belongs to.

    Attributes:
        name: short name (the run directory's name, or the MLflow run name).
        source: where it was loaded from (a path, or ``mlflow:<run_id>``).
        config: the resolved ``ExperimentConfig`` as a nested dict.
        ledger: one row per recorded step, sorted by ``step``; ledger column names (``docs/internals.md``).
        method: the method label (see the module docstring).
        kind: ``agent.kind`` (``uniform`` marks the baseline).
        seed: the run's seed.
        domain_names: domain names in config order (index i is domain i everywhere).
        target_domains: the domains counted in ``val/mean_ppl`` (``target: true``).
    """

    name: str
    source: str
    config: dict[str, Any]
    ledger: pd.DataFrame
    method: str
    kind: str
    seed: int
    domain_names: list[str]
    target_domains: list[str] = field(default_factory=list)

    @property
    def is_uniform(self) -> bool:
        """True for a uniform-mixture baseline run."""
        return self.kind == "uniform"


def get_dotted(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``, or ``default`` when any part is absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; lists and empty dicts stay single values (for comparisons)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


# Keys expected to differ between seeds of one method.
PER_RUN_KEYS: frozenset[str] = frozenset({"name", "seed", "output_dir", "tracking.run_name", "ray.storage_path", "agent.policy"})


def config_differences(configs: Sequence[dict]) -> dict[str, list]:
    """Dotted keys whose values differ between ``configs``, with each config's value (None if absent)."""
    flat = [flatten_config(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = {}
    for key in keys:
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[key] = values
    return out



def derive_method(config: dict[str, Any]) -> str:
    """The method label implied by the config alone (rule 3 of the module docstring)."""
    kind = get_dotted(config, "agent.kind")
    if kind == "ac_odm":
        parts = ["proxy" if get_dotted(config, "agent.mode", "online") == "frozen" else "online"]
        if get_dotted(config, "env.reward_mode", "mixture") == "reference":
            parts.append("reference reward")
        if get_dotted(config, "env.observation_mode", "default") == "reference":
            parts.append("reference observation")
        if parts[0] == "online" and len(parts) > 1:
            parts = parts[1:]
        return f"AC-ODM ({', '.join(parts)})"
    if kind == "fixed":
        return _fixed_label(get_dotted(config, "agent.weights") or {}, _domain_names(config, "<config>"))
    return _SIMPLE_LABELS.get(str(kind), str(kind))


def _fixed_label(weights: dict[str, float], domain_names: list[str]) -> str:
    """``fixed (a 0.5, b 0.5)`` for up to 6 domains, else ``fixed #<hash of the weights>``."""
    total = sum(float(v) for v in weights.values()) or 1.0
    normalised = {name: float(weights.get(name, 0.0)) / total for name in domain_names}
    if len(domain_names) <= 6:
        return "fixed (" + ", ".join(f"{n} {w:.2g}" for n, w in normalised.items()) + ")"
    digest = hashlib.sha1(json.dumps(normalised, sort_keys=True).encode()).hexdigest()[:6]
    return f"fixed #{digest}"


def _domain_names(config: dict[str, Any], source: str) -> list[str]:
    domains = get_dotted(config, "data.domains")
    if not isinstance(domains, list) or not domains:
        raise ValueError(f"{source}: data.domains must be a non-empty list of domains, got {domains!r}")
    names = []
    for i, d in enumerate(domains):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError(f"{source}: data.domains[{i}] must be a mapping with a 'name', got {d!r}")
        names.append(d["name"])
    return names


def _target_domains(config: dict[str, Any], names: list[str]) -> list[str]:
    domains = get_dotted(config, "data.domains")
    return [n for n, d in zip(names, domains, strict=True) if d.get("target", True)]


def make_run(
    *, name: str, source: str, config: dict[str, Any], ledger: pd.DataFrame, method: str | None = None,
    tags: dict[str, str] | None = None,
) -> Run:
    """Validate a config dict and a ledger DataFrame into a ``Run`` (shared by both loaders)."""
    kind = get_dotted(config, "agent.kind")
    if not isinstance(kind, str):
        raise ValueError(f"{source}: agent.kind is missing from the config (got {kind!r})")
    names = _domain_names(config, source)
    ledger = _check_ledger(ledger, source)
    tag = (tags or {}).get("method") or get_dotted(config, "tracking.tags.method")
    label = method or tag or derive_method(config)
    seed = get_dotted(config, "seed", 0)
    return Run(
        name=name, source=source, config=config, ledger=ledger, method=str(label), kind=kind,
        seed=int(seed), domain_names=names, target_domains=_target_domains(config, names),
    )


def _check_ledger(ledger: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_LEDGER_COLUMNS if c not in ledger.columns]
    if missing:
        raise ValueError(f"{source}: ledger lacks the columns {missing} (has {sorted(ledger.columns)[:12]}...)")
    if ledger.empty:
        raise ValueError(f"{source}: ledger has no rows (the run recorded no step)")
    steps = pd.to_numeric(ledger["step"], errors="coerce")
    if steps.isna().any() or (steps < 0).any():
        raise ValueError(f"{source}: ledger column 'step' must hold integers >= 0 (0: the untrained model's evaluation)")
    dupes = sorted(set(steps[steps.duplicated()].astype(int)))
    if dupes:
        raise ValueError(f"{source}: ledger repeats steps {dupes[:10]}; every step must appear once")
    out = ledger.assign(step=steps.astype("int64")).sort_values("step", kind="stable").reset_index(drop=True)
    return out


def read_config(path: Path) -> dict[str, Any]:
    """Read a run's ``config.yaml`` as a dict, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: a run directory must hold the resolved config written by `acodm train`"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (the resolved ExperimentConfig), got {type(data).__name__}")
    return data


def read_ledger(path: Path) -> pd.DataFrame:
    """Read ``ledger.parquet``, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no ledger (did it record any step?)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path} is not a readable parquet ledger: {type(exc).__name__}: {exc}") from None


def load_run(run_dir: str | os.PathLike[str], *, method: str | None = None) -> Run:
    """Load one run directory.

    Args:
        run_dir: a directory holding ``config.yaml`` and ``ledger.parquet``.
        method: optional label overriding the tag and the derived label.

    Returns:
        The ``Run``.

    Raises:
        FileNotFoundError: the directory, its config or its ledger does not exist.
        ValueError: the config or ledger is unreadable or lacks required fields/columns.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist or is not a directory")
    config = read_config(path / CONFIG_FILE)
    ledger = read_ledger(path / LEDGER_FILE)
    return make_run(name=path.name, source=str(path), config=config, ledger=ledger, method=method)


# ------------------------------------------------------------------------------------------------ MLflow
def load_mlflow_runs(
    tracking_uri: str, experiment_name: str, *, run_status: str | None = "FINISHED"
) -> list[Run]:
    """Load every run of an MLflow experiment that has metrics, in the ``Run`` shape.

    The config comes from the run's ``config.yaml`` artifact when present, else from its params
    (flattened dotted names, unflattened here). Metric names are mapped to ledger columns
    (``mix/weight/<d>`` -> ``weight/<d>``, ``lm/loss`` -> ``loss``, ``env/reward`` -> ``reward``,
    ``perf/step_s`` -> ``time/step_s``; ``val/*`` and ``agent/*`` keep their names). ``tokens`` is
    steps times the tokens per step implied by the config unless a ``tokens`` metric was logged, and
    ``wall_time`` comes from the metric timestamps. Parent runs without metrics are skipped.

    Args:
        tracking_uri: the MLflow tracking URI (``sqlite:///...``, ``http://...``, a directory).
        experiment_name: the experiment to read.
        run_status: keep only runs with this status (``None`` keeps all).

    Returns:
        One ``Run`` per run with metrics, oldest first.

    Raises:
        ValueError: the experiment does not exist.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise ValueError(f"MLflow experiment {experiment_name!r} not found at {tracking_uri}; it has {known}")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"],
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    out = []
    for mlrun in runs:
        if run_status is not None and mlrun.info.status != run_status:
            continue
        if not mlrun.data.metrics:
            log.debug("skipping MLflow run %s: no metrics (a parent run?)", mlrun.info.run_id)
            continue
        out.append(_run_from_mlflow(client, tracking_uri, mlrun))
    return out


def _run_from_mlflow(client: Any, tracking_uri: str, mlrun: Any) -> Run:
    run_id = mlrun.info.run_id
    source = f"mlflow:{run_id}"
    config = _mlflow_config(tracking_uri, client, run_id) or unflatten_params(mlrun.data.params)
    domains = get_dotted(config, "data.domains")
    if not (isinstance(domains, list) and domains and all(isinstance(d, dict) for d in domains)):
        names = sorted({k.split("/", 2)[2] for k in mlrun.data.metrics if k.startswith(("mix/weight/", "val/ppl/"))})
        log.warning("MLflow run %s: data.domains not recoverable from params; using %s (all as targets)",
                    run_id, names)
        config.setdefault("data", {})["domains"] = [{"name": n, "target": True} for n in names]
    columns: dict[str, dict[int, float]] = {}
    first_ts: dict[int, int] = {}
    for key in mlrun.data.metrics:
        col = ledger_column(key)
        for m in client.get_metric_history(run_id, key):
            columns.setdefault(col, {})[int(m.step)] = float(m.value)
            first_ts[int(m.step)] = min(first_ts.get(int(m.step), m.timestamp), m.timestamp)
    ledger = pd.DataFrame(columns).sort_index()
    ledger = ledger[ledger.index > 0]
    ledger.index.name = "step"
    ledger = ledger.reset_index()
    if "tokens" not in ledger.columns:
        ledger["tokens"] = ledger["step"] * tokens_per_step(config)
    if "wall_time" not in ledger.columns:
        start_ms = mlrun.info.start_time or min(first_ts.values())
        ledger["wall_time"] = [(first_ts[int(s)] - start_ms) / 1000.0 for s in ledger["step"]]
    name = mlrun.data.tags.get("mlflow.runName") or mlrun.info.run_name or run_id
    return make_run(name=name, source=source, config=config, ledger=ledger, tags=mlrun.data.tags)


def ledger_column(metric_key: str) -> str:
    """The ledger column for an MLflow metric key (see ``load_mlflow_runs``)."""
    if metric_key in _MLFLOW_EXACT:
        return _MLFLOW_EXACT[metric_key]
    for prefix, replacement in _MLFLOW_PREFIX.items():
        if metric_key.startswith(prefix):
            return replacement + metric_key[len(prefix):]
    return metric_key


def tokens_per_step(config: dict[str, Any]) -> int:
    """Global tokens per optimiser step: world size x grad_accum x micro_batch_size x seq_len."""
    world = 1
    if get_dotted(config, "ray.enabled", True):
        world = max(int(get_dotted(config, "ray.num_workers", 1) or 1), 1)
    return (world * int(get_dotted(config, "sampler.grad_accum", 4))
            * int(get_dotted(config, "sampler.micro_batch_size", 8)) * int(get_dotted(config, "lm.seq_len", 128)))


def _mlflow_config(tracking_uri: str, client: Any, run_id: str) -> dict[str, Any] | None:
    """The run's ``config.yaml`` artifact (anywhere in the artifact tree's first two levels), if any."""
    try:
        candidates = [a for a in client.list_artifacts(run_id) if not a.is_dir and a.path.endswith(CONFIG_FILE)]
        if not candidates:
            for d in (a for a in client.list_artifacts(run_id) if a.is_dir):
                candidates += [a for a in client.list_artifacts(run_id, d.path) if a.path.endswith(CONFIG_FILE)]
        if not candidates:
            return None
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = download_artifacts(
                run_id=run_id, artifact_path=candidates[0].path, dst_path=tmp, tracking_uri=tracking_uri
            )
            return read_config(Path(local))
    except (OSError, ValueError) as exc:
        log.warning("MLflow run %s: could not read its config artifact (%s); using its params", run_id, exc)
        return None


def unflatten_params(params: dict[str, str]) -> dict[str, Any]:
    """Rebuild a nested config from MLflow params (dotted names, values as ``str(value)``)."""
    out: dict[str, Any] = {}
    for key in sorted(params):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                log.warning("MLflow param %s conflicts with a value at %s; ignored", key, part)
                break
            node = child
        else:
            node[parts[-1]] = _parse_param(params[key])
    return out


def _parse_param(text: str) -> Any:
    """MLflow stores ``str(value)``: Python literals come back through ``ast.literal_eval``."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
