"""Test helpers for ``tests/ray_jobs``: a slow agent, and private Ray / MLflow servers.

``make_slow_ac_odm`` builds an AC-ODM mixer whose gradient steps sleep (an agent far slower than
the LM). This module is pickled by value, so Ray workers need not import it.

``LocalRayHead`` and ``MlflowServer`` start servers in a **new process session** and stop them by
that session: SIGTERM to the session leader (``ray start --block`` then tears its own cluster down),
then SIGKILL to whatever is left *in that session only*. Ray's ``ray stop`` is never used: it kills
every Ray process on the machine, including other people's clusters and the shared test fixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

VENV_BIN = Path(sys.executable).parent


def make_slow_ac_odm(
    agent_cfg: Any, observation_space: Any, action_space: Any, *, step_sleep_s: float, **kwargs: Any
) -> Any:
    """A ``mixer_factory``: the real AC-ODM mixer whose every gradient step also sleeps ``step_sleep_s``
    (an agent far slower than an LM step; the sleep sits inside the update, after the actor moved)."""
    from agents.base import build_mixer

    mixer = build_mixer(agent_cfg, observation_space, action_space, **kwargs)
    real_step = mixer._gradient_step

    def slow_step() -> dict[str, float]:
        metrics = real_step()
        time.sleep(step_sleep_s)
        return metrics

    mixer._gradient_step = slow_step
    return mixer


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes whose session id is ``sid`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_session(leader: subprocess.Popen, grace_s: float = 30.0) -> list[int]:
    """SIGTERM the session leader, wait for its session to empty, SIGKILL what is left of *that* session.

    Returns:
        The pids that had to be SIGKILLed (empty when the graceful stop worked).
    """
    sid = leader.pid
    if leader.poll() is None:
        leader.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_pids(sid):
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=0.2)
    leftovers = session_pids(sid)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=5)
    return leftovers


def _wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s} s:\n{log_path.read_text()[-3000:]}")


class LocalRayHead:
    """A private Ray head (``ray start --head --block``) on 127.0.0.1, owned and stopped by the test.

    Every port Ray would otherwise take at a fixed default (GCS 6379, client 10001, dashboard 8265,
    dashboard agent 52365, ...) is a fresh free port, and ``--temp-dir`` is a private short directory
    (unix socket paths must stay under 108 bytes, which pytest's ``tmp_path`` can exceed), so this head
    cannot collide with another Ray on the machine. Token auth is disabled (``RAY_AUTH_MODE=disabled``)
    for the head and for the ``ray job`` client.
    """

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="acodm-ray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        # Job entrypoints run with the head's PATH: put this interpreter's bin first, as on a cluster
        # whose nodes have the project's environment active.
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.proc: subprocess.Popen | None = None
        self.killed: list[int] = []

    @property
    def dashboard_url(self) -> str:
        """The Jobs API address for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> LocalRayHead:
        """Start the head in a new session and wait until the Jobs API answers."""
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus),
            "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard=true", "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
        ]  # fmt: skip
        log_path = self.temp_dir / "ray-start.log"
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_http(f"{self.dashboard_url}/api/version", self.proc, log_path, timeout_s)
        return self

    def stop(self) -> None:
        """Stop this head's processes (and only them), then remove its temp dir."""
        if self.proc is not None:
            self.killed = stop_session(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with one worker and no job runner, in its own process session."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.backend_uri = f"sqlite:///{(self.root / 'server.db').resolve()}"
        self.artifact_root = (self.root / "server-artifacts").resolve()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The HTTP tracking URI."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start the server and wait for ``/health``."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", self.backend_uri,
            "--default-artifact-root", self.artifact_root.as_uri(),
        ]  # fmt: skip
        log_path = self.root / "mlflow-server.log"
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_http(f"{self.url}/health", self.proc, log_path, timeout_s)
        return self

    def stop(self) -> None:
        """Stop the server's process session."""
        if self.proc is not None:
            stop_session(self.proc, grace_s=15.0)


def tiny_config(output_dir: Path, **overrides: Any) -> Any:
    """A valid ``ExperimentConfig`` with two domains, writing under ``output_dir``; ``overrides`` are
    top-level sections merged over the defaults (e.g. ``ray={"address": "..."}``)."""
    from ray_jobs.config import ExperimentConfig

    data: dict[str, Any] = {
        "name": "unit",
        "output_dir": str(output_dir),
        "data": {
            "prepared_dir": str(Path(output_dir) / "prepared"),
            "domains": [
                {"name": "code", "source": {"paths": ["code.jsonl"]}},
                {"name": "Wiki(en)", "source": {"paths": ["wiki.jsonl"]}},
            ],
        },
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.from_dict(data)
