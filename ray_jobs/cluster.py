"""Connecting to Ray, and failing fast on clusters that cannot run the job.

``acodm train`` runs in three places, and ``connect`` handles each:

* **Local, no cluster** (no ``ray.address``, no ``RAY_ADDRESS``): start an embedded Ray with the
  machine's CPUs, on loopback only (``loopback_only``: every Ray server listens on 127.0.0.1 and the node
  registers as 127.0.0.1; Ray's token authentication stays as Ray sets it, on by default in 2.60), without
  the dashboard unless asked, and with its workers at the driver's niceness (``local_system_config``).
* **Inside ``ray job submit``**: the job supervisor sets ``RAY_ADDRESS`` to the cluster's GCS address and
  gives the job the submitted ``--working-dir`` as its runtime env, which every task and actor of the
  job inherits. So no ``runtime_env`` is needed here (``job_runtime_env`` returns None).
* **A driver outside the cluster** (``ray.address: host:6379`` or ``ray://host:10001``): the workers
  cannot see this machine's files, so ``job_runtime_env`` ships the top-level packages as
  ``py_modules``.

Before ``ray.init`` the address is checked with a plain TCP connect, so an unreachable cluster is a
``ConnectionError`` naming the address within seconds instead of a long hang inside Ray.
``check_resources`` compares what the job asks for with what the cluster has, because Ray would
otherwise wait forever for a placement group that can never be scheduled; ``check_storage`` probes the
storage path with a real write before any training starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_jobs.allocator import allocator_env
from ray_jobs.config import ExperimentConfig

log = logging.getLogger(__name__)

RAY_CLIENT_DEFAULT_PORT = 10001
CONNECT_TIMEOUT_S = 3.0
# The top-level packages a remote worker needs (pyproject's packages.find include list).
PROJECT_PACKAGES = ("envs", "agents", "ray_jobs", "analysis")
# Set by the Ray job supervisor in the environment of a submitted job's entrypoint.
_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray's raylet starts every worker process (Ray Train workers, the agent actor, Ray Train's controller)
# at this niceness; Ray's default is 15, read from this environment variable when the raylet starts.
WORKER_NICENESS_ENV_VAR = "RAY_worker_niceness"
# The niceness of the workers of a local Ray started by ``connect``: the same as the driver's.
LOCAL_WORKER_NICENESS = 0


# Ray 2.60 turns a node IP of 127.0.0.1 into this machine's outward address (``ray._private.services.
# resolve_ip_for_localhost``, used by ``ray.init(_node_ip_address=...)`` and ``ray start --node-ip-address``)
# unless Ray's multi-node mode is off, which is its default on macOS and Windows and is switched by this
# variable (read into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` when ray is imported). With the
# outward address the GCS, raylet and worker gRPC servers listen on every interface (``::``); with
# 127.0.0.1 they and the dashboard's servers listen on loopback only (measured with /proc/net/tcp{,6},
# tests/ray_jobs/test_loopback.py). Ray has no bind-address setting for its gRPC servers.
LOOPBACK_ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class InsufficientResourcesError(ValueError):
    """The cluster cannot schedule what the job asks for; the message names the shortfall."""


def resolve_address(cfg: ExperimentConfig) -> str | None:
    """The Ray address to use: ``ray.address`` > ``RAY_ADDRESS`` > None (start a local Ray)."""
    if cfg.ray.address:
        return cfg.ray.address.strip()
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env or None


def in_submitted_job() -> bool:
    """True when this process is the entrypoint of a ``ray job submit`` job."""
    return _JOB_ENV_VAR in os.environ


def parse_address(address: str) -> tuple[str, int] | None:
    """The ``(host, port)`` to probe for an address, or None for ``auto``/``local`` (nothing to probe).

    Raises:
        ValueError: an address ``ray.init`` cannot use (a dashboard ``http://`` URL, no port, bad port).
    """
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise ValueError(
            f"ray.address {address!r} is a dashboard / Jobs API URL; use it with `ray job submit --address "
            f"{address}`, and give ray.address the cluster's GCS address (host:6379) or a Ray Client "
            f"address (ray://host:10001)"
        )
    if address.startswith("ray://"):
        parsed = urlparse(address)
        try:
            port = parsed.port or RAY_CLIENT_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"ray.address {address!r}: the port is not a number in 0-65535") from None
        if not parsed.hostname:
            raise ValueError(f"ray.address {address!r} has no host; expected ray://host:port")
        return parsed.hostname, port
    if "://" in address:
        raise ValueError(
            f"ray.address {address!r}: unknown scheme; expected host:port, ray://host:port or auto"
        )
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f"ray.address {address!r} needs a port: expected host:port (the GCS port, usually 6379)"
        )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"ray.address {address!r}: port {port_text!r} is not a number in 1-65535")
    return host.strip("[]"), int(port_text)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the address's host:port.

    Raises:
        ConnectionError: nothing accepts connections there within ``timeout_s``.
        ValueError: the address has a form ``ray.init`` cannot use.
    """
    target = parse_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at ray.address/RAY_ADDRESS {address!r} ({host}:{port}): {exc}. "
            f"Is the head node running (`ray start --head`) and the port open? Unset ray.address and "
            f"RAY_ADDRESS to run on a local Ray instead."
        ) from None


def local_num_cpus() -> int:
    """CPUs this process may use (its affinity mask, not the whole machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def local_system_config() -> dict[str, Any]:
    """``_system_config`` for a local Ray started by ``connect``: workers at the driver's priority.

    Ray starts workers at niceness 15 so that its daemons stay responsive when workers saturate the
    CPUs. Here the workers are the job: at niceness 15 the Ray Train worker yields its core to every
    other runnable process (Ray's own daemons, the driver, anything else on the machine), which made
    Ray Train steps measurably slower than in-process on a busy node (benchmarks/RESULTS.md,
    "Overhead"). An explicit ``RAY_worker_niceness`` in the environment wins.
    A cluster started elsewhere keeps its own setting (``RAY_worker_niceness=0 ray start ...``).
    """
    if WORKER_NICENESS_ENV_VAR in os.environ:
        return {}
    return {"worker_niceness": LOCAL_WORKER_NICENESS}


def job_runtime_env(address: str | None) -> dict[str, Any]:
    """The ``runtime_env`` of this driver's Ray job: the allocator settings for every worker and, for a
    driver connecting from outside the cluster, the top-level packages as ``py_modules`` (uploaded by
    Ray). A local Ray's workers share this machine's files and interpreter, and a submitted job's
    ``--working-dir`` already travels to every worker, so neither ships the packages.
    """
    runtime_env: dict[str, Any] = {"env_vars": allocator_env()}
    if address is None or address == "local" or in_submitted_job():
        return runtime_env
    root = Path(__file__).resolve().parent.parent
    runtime_env["py_modules"] = [str(root / name) for name in PROJECT_PACKAGES if (root / name).is_dir()]
    return runtime_env


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Keep a Ray started inside the block on 127.0.0.1: registered there and listening nowhere else.

    Sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (inherited by the GCS, raylet, dashboard and every worker
    this process starts) and the constant Ray read from it at import time (ray may already be imported),
    and restores both afterwards. A local Ray is one machine, so Ray's multi-node mode has nothing to do,
    and no other machine can reach (or join) a Ray that listens on loopback only, which is the point.
    """
    import ray._private.ray_constants as ray_constants

    old_env = os.environ.get(LOOPBACK_ENV_VAR)
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(LOOPBACK_ENV_VAR, None)
        else:
            os.environ[LOOPBACK_ENV_VAR] = old_env


@contextlib.contextmanager
def connect(
    cfg: ExperimentConfig, *, include_dashboard: bool = False, timeout_s: float = CONNECT_TIMEOUT_S
) -> Iterator[str | None]:
    """Make Ray available for the block; yields the address used (None = a local Ray started here).

    If Ray is already initialised (a test fixture, a Tune trial, a notebook) it is reused and left
    running. Otherwise Ray is initialised here and shut down on exit.

    Raises:
        ConnectionError: the configured address is unreachable (checked before ``ray.init``).
        ValueError: the address has a form ``ray.init`` cannot use.
    """
    import ray

    if ray.is_initialized():
        yield resolve_address(cfg)
        return
    address = resolve_address(cfg)
    no_color_when_redirected()
    with contextlib.ExitStack() as stack:
        if address is None:
            num_cpus = local_num_cpus()
            log.info("starting a local Ray with %d CPUs on 127.0.0.1 (loopback only)", num_cpus)
            stack.enter_context(loopback_only())
            stack.enter_context(quiet_logger(RAY_AUTH_NOTICE_LOGGER))
            ray.init(
                address="local",  # a new Ray of our own, never someone else's already running here
                num_cpus=num_cpus,
                include_dashboard=include_dashboard,
                _node_ip_address="127.0.0.1",
                _system_config=local_system_config() or None,
                runtime_env=job_runtime_env(None),
                configure_logging=False,
                log_to_driver=cfg.ray.log_to_driver,
            )
        else:
            check_reachable(address, timeout_s)
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, runtime_env=job_runtime_env(address), configure_logging=False,
                     log_to_driver=cfg.ray.log_to_driver)
        try:
            yield address
        finally:
            ray.shutdown()


# Ray 2.60 tells every new local cluster, at WARNING, that it enabled token authentication (and how to opt
# out). Ours listens on loopback only and is gone when the run ends: the notice is start-up chatter there.
RAY_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """For the block, drop the records of logger ``name`` below ``level`` (an internal Ray module's logger:
    if it moves in another Ray version, its lines simply come back)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def no_color_when_redirected() -> None:
    """Ray prefixes the worker lines it forwards to the driver with ANSI colour codes even when the
    driver's output is a file or a job log; ``RAY_COLOR_PREFIX=0`` (unless the user set it) drops them there."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def worker_resources(resources_per_worker: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """One Ray Train worker's bundle, as ``ScalingConfig`` computes it (zeros dropped, GPU 1 if use_gpu)."""
    bundle = {name: float(v) for name, v in resources_per_worker.items() if v != 0}
    if not use_gpu and bundle.get("GPU", 0) > 0:
        raise ValueError(
            f"ray.resources_per_worker asks for GPU={bundle['GPU']} but ray.use_gpu is false; "
            f"set ray.use_gpu: true or drop GPU from ray.resources_per_worker"
        )
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def _fmt(value: float) -> str:
    return f"{value:g}"


def check_resources(
    num_workers: int,
    resources_per_worker: Mapping[str, float],
    use_gpu: bool,
    agent_resources: Mapping[str, float],
    *,
    cluster_resources: Mapping[str, float] | None = None,
    node_resources: list[Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Fail at once if the cluster cannot hold the LM workers plus the agent actor.

    Ray would otherwise wait forever for a placement group that never fits. Checks the totals against
    ``ray.cluster_resources()`` and, since a worker's bundle must fit on one node, each bundle against
    the largest node. ``num_workers=0`` (the train loop in the driver) needs no worker bundles.
    Autoscaling clusters report only their current nodes: this check is for fixed-size clusters.

    Args:
        num_workers: Ray Train workers (``ray.num_workers``).
        resources_per_worker: one worker's bundle (``ray.resources_per_worker``).
        use_gpu: ``ray.use_gpu`` (adds 1 GPU per worker unless the bundle names GPU).
        agent_resources: the agent actor's resources (``ray.agent_resources``).
        cluster_resources: totals to compare with; default ``ray.cluster_resources()``.
        node_resources: per-node totals; default from ``ray.nodes()`` (alive nodes).

    Returns:
        The total resources asked for.

    Raises:
        InsufficientResourcesError: naming each missing resource, what was asked and what exists.
    """
    bundle = worker_resources(resources_per_worker, use_gpu) if num_workers > 0 else {}
    agent = {name: float(v) for name, v in agent_resources.items() if v != 0}
    if cluster_resources is None or node_resources is None:
        import ray

        if cluster_resources is None:
            cluster_resources = ray.cluster_resources()
        if node_resources is None:
            node_resources = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    names = sorted(set(bundle) | set(agent))
    asked = {name: num_workers * bundle.get(name, 0.0) + agent.get(name, 0.0) for name in names}
    problems: list[str] = []
    short: set[str] = set()
    for name in names:
        have = float(cluster_resources.get(name, 0.0))
        if asked[name] > have + 1e-9:
            short.add(name)
            problems.append(
                f"asked for {num_workers} workers x {_fmt(bundle.get(name, 0.0))} {name} + agent "
                f"{_fmt(agent.get(name, 0.0))} {name} = {_fmt(asked[name])} {name}, cluster has {_fmt(have)} {name}"
            )
    # A bundle must fit on one node: totals can suffice while no single node is big enough.
    largest = {name: max((float(n.get(name, 0.0)) for n in node_resources), default=0.0) for name in names}
    for who, field, needs in (
        ("one worker", "ray.resources_per_worker", bundle),
        ("the agent actor", "ray.agent_resources", agent),
    ):
        for name, need in needs.items():
            if name not in short and need > largest[name] + 1e-9:
                problems.append(
                    f"{who} needs {_fmt(need)} {name} ({field}) but the largest node has {_fmt(largest[name])} {name}"
                )
    if problems:
        raise InsufficientResourcesError(
            "the Ray cluster cannot run this job: "
            + "; ".join(problems)
            + ". Lower ray.num_workers / ray.resources_per_worker / ray.agent_resources, or use a bigger cluster."
        )
    return asked


def check_storage(path: str | os.PathLike[str], *, field: str = "ray.storage_path") -> str:
    """Probe a storage location with a real write, before any training starts.

    Local paths (or ``file://`` URIs) are created if absent, then a small probe file is written and
    removed. Other URIs (``s3://``, ``gs://``, ...) are probed through ``pyarrow.fs`` the same way.

    Returns:
        The absolute local path, or the URI unchanged.

    Raises:
        PermissionError / NotADirectoryError / ValueError: naming ``field`` and the path.
    """
    text = os.fspath(path)
    if not text:
        raise ValueError(f"{field} is empty; expected a directory or a URI such as s3://bucket/prefix")
    scheme = urlparse(text).scheme
    if scheme and scheme != "file" and len(scheme) > 1:
        _check_uri_storage(text, field)
        return text
    local = Path(urlparse(text).path if scheme == "file" else text).expanduser().resolve()
    probe = local / f".acodm-write-probe-{uuid.uuid4().hex}"
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except FileExistsError:
        raise NotADirectoryError(f"{field} {text!r}: {local} exists and is not a directory") from None
    except NotADirectoryError:
        raise NotADirectoryError(
            f"{field} {text!r}: a parent of {local} is a file, not a directory"
        ) from None
    except OSError as exc:
        raise PermissionError(f"{field} {text!r} is not writable ({local}): {exc.strerror or exc}") from None
    return str(local)


def _check_uri_storage(uri: str, field: str) -> None:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{field} {uri!r} is not a storage URI pyarrow can open: {exc}") from None
    probe = f"{root.rstrip('/')}/.acodm-write-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        raise PermissionError(f"{field} {uri!r} is not writable: {exc}") from None


def ray_options(resources: Mapping[str, float], *, field: str = "ray.agent_resources") -> dict[str, Any]:
    """``.options(...)`` keywords for an actor from a resource dict (``CPU``, ``GPU``, ``memory``, custom)."""
    opts: dict[str, Any] = {"num_cpus": 0.0}
    custom: dict[str, float] = {}
    for name, value in resources.items():
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{field}[{name!r}] = {value!r}: expected a finite number >= 0")
        if name == "CPU":
            opts["num_cpus"] = float(value)
        elif name == "GPU":
            opts["num_gpus"] = float(value)
        elif name == "memory":
            opts["memory"] = int(value)
        else:
            custom[name] = float(value)
    if custom:
        opts["resources"] = custom
    return opts
