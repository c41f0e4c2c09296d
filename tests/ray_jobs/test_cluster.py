"""ray_jobs.cluster: address resolution, fast failures (unreachable cluster, too few resources, unwritable
storage) and the runtime env a driver needs."""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest

from ray_jobs import cluster
from ray_jobs.allocator import ALLOCATOR_ENV, allocator_env
from ray_jobs.cluster import (
    InsufficientResourcesError,
    check_reachable,
    check_resources,
    check_storage,
    connect,
    job_runtime_env,
    parse_address,
    ray_options,
    resolve_address,
)
from tests.ray_jobs.ray_helpers import free_port, tiny_config


def test_resolve_address_prefers_config_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(tiny_config(tmp_path)) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(tiny_config(tmp_path)) == "10.0.0.5:6379"
    assert resolve_address(tiny_config(tmp_path, ray={"address": "ray://head:10001"})) == "ray://head:10001"


def test_parse_address_forms() -> None:
    assert parse_address("head.example:6379") == ("head.example", 6379)
    assert parse_address("ray://head:1234") == ("head", 1234)
    assert parse_address("ray://head") == ("head", cluster.RAY_CLIENT_DEFAULT_PORT)
    assert parse_address("auto") is None
    with pytest.raises(ValueError, match="dashboard / Jobs API URL.*ray job submit"):
        parse_address("http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="needs a port"):
        parse_address("headnode")
    with pytest.raises(ValueError, match="port 'abc' is not a number"):
        parse_address("headnode:abc")
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_address("grpc://head:1")


def _closed_port() -> int:
    """A port with nothing listening (bound then released)."""
    return free_port()


@pytest.mark.parametrize("form", ["{host}:{port}", "ray://{host}:{port}"])
def test_unreachable_address_fails_fast_naming_it(form: str) -> None:
    address = form.format(host="127.0.0.1", port=_closed_port())
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at .*{address}"):
        check_reachable(address, timeout_s=2.0)
    assert time.monotonic() - start < 5.0


def test_reachable_address_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")


def test_connect_to_unreachable_cluster_raises_before_ray_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    # Behave as if no Ray were running here (a session fixture may have started one).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not be reached"))
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=address), connect(tiny_config(tmp_path)):
        pass
    assert time.monotonic() - start < 5.0


def test_connect_local_starts_ray_on_all_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with connect(tiny_config(tmp_path)) as address:
        assert address is None
    assert calls[0]["address"] == "local"  # a Ray of its own, never one already running on the machine
    assert calls[0]["num_cpus"] == cluster.local_num_cpus()
    assert calls[0]["include_dashboard"] is False
    assert calls[0]["_node_ip_address"] == "127.0.0.1"
    assert calls[0]["_system_config"] == {"worker_niceness": 0}  # workers at the driver's priority
    assert calls[0]["runtime_env"] == {"env_vars": allocator_env()}  # the workers' allocator settings
    assert calls[-1] == "shutdown"


def test_connect_local_keeps_an_explicit_worker_niceness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_worker_niceness", "10")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with connect(tiny_config(tmp_path)):
        pass
    assert calls[0]["_system_config"] is None  # Ray reads the user's RAY_worker_niceness itself


def test_job_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")  # the user's own setting wins
    expected_env = {**ALLOCATOR_ENV, "MALLOC_MMAP_THRESHOLD_": "4096"}
    assert job_runtime_env(None) == {"env_vars": expected_env}  # a local Ray: workers share our files
    env = job_runtime_env("head:6379")
    assert env["env_vars"] == expected_env
    assert sorted(Path(p).name for p in env["py_modules"]) == ["agents", "analysis", "envs", "ray_jobs"]
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in env["py_modules"])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside `ray job submit`: the working dir travels
    assert job_runtime_env("head:6379") == {"env_vars": expected_env}


def test_too_many_workers_names_the_shortfall() -> None:
    with pytest.raises(InsufficientResourcesError) as err:
        check_resources(
            3,
            {"CPU": 1.0},
            False,
            {"CPU": 0.0},
            cluster_resources={"CPU": 2.0},
            node_resources=[{"CPU": 2.0}],
        )
    assert "asked for 3 workers x 1 CPU + agent 0 CPU = 3 CPU, cluster has 2 CPU" in str(err.value)


def test_gpus_asked_on_a_cpu_cluster() -> None:
    with pytest.raises(
        InsufficientResourcesError, match=r"2 workers x 1 GPU \+ agent 0.5 GPU = 2.5 GPU, cluster has 0 GPU"
    ):
        check_resources(
            2, {"CPU": 1.0}, True, {"GPU": 0.5}, cluster_resources={"CPU": 8.0}, node_resources=[{"CPU": 8.0}]
        )


def test_worker_bigger_than_any_node() -> None:
    with pytest.raises(InsufficientResourcesError, match="one worker needs 3 CPU .* largest node has 2 CPU"):
        check_resources(
            1,
            {"CPU": 3.0},
            False,
            {},
            cluster_resources={"CPU": 4.0},
            node_resources=[{"CPU": 2.0}, {"CPU": 2.0}],
        )


def test_resources_that_fit_return_the_totals() -> None:
    asked = check_resources(
        2, {"CPU": 0.9}, False, {"CPU": 0.2}, cluster_resources={"CPU": 2.0}, node_resources=[{"CPU": 2.0}]
    )
    assert asked == pytest.approx({"CPU": 2.0})
    # num_workers=0: the loop runs in the driver; only the agent needs room
    assert check_resources(0, {"CPU": 1.0}, False, {"CPU": 1.0}, cluster_resources={"CPU": 1.0},
                           node_resources=[{"CPU": 1.0}]) == {"CPU": 1.0}  # fmt: skip


def test_gpu_in_bundle_without_use_gpu_is_rejected() -> None:
    with pytest.raises(ValueError, match="ray.use_gpu is false"):
        check_resources(1, {"GPU": 1}, False, {}, cluster_resources={"GPU": 1}, node_resources=[{"GPU": 1}])


@pytest.mark.ray
def test_check_resources_reads_the_live_cluster(ray_session) -> None:
    with pytest.raises(InsufficientResourcesError, match="= 3 CPU, cluster has 2 CPU"):
        check_resources(3, {"CPU": 1.0}, False, {"CPU": 0.0})
    assert check_resources(2, {"CPU": 0.9}, False, {"CPU": 0.0})["CPU"] == pytest.approx(1.8)


def test_storage_writable_is_created_and_left_clean(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_storage(target) == str(target.resolve())
    assert target.is_dir() and list(target.iterdir()) == []
    assert check_storage(target.as_uri()) == str(target.resolve())


def test_storage_unwritable_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(PermissionError, match="ray.storage_path '/sys/acodm-storage' is not writable"):
        check_storage("/sys/acodm-storage")
    assert not Path("/sys/acodm-storage").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        check_storage(a_file)
    with pytest.raises(NotADirectoryError, match="a parent of .* is a file"):
        check_storage(a_file / "sub" / "dir")
    assert a_file.read_text() == "x"  # nothing half-written


def test_ray_options_from_resources() -> None:
    assert ray_options({"CPU": 0.0}) == {"num_cpus": 0.0}
    assert ray_options({"CPU": 1, "GPU": 0.25, "memory": 1e9, "accel": 1}) == {
        "num_cpus": 1.0,
        "num_gpus": 0.25,
        "memory": 1_000_000_000,
        "resources": {"accel": 1.0},
    }
    with pytest.raises(ValueError, match=r"ray.agent_resources\['CPU'\] = -1"):
        ray_options({"CPU": -1})


def test_ray_colour_codes_are_off_when_the_output_is_redirected(monkeypatch) -> None:
    from ray_jobs.cluster import no_color_when_redirected

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a file, not a terminal
    no_color_when_redirected()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's choice wins
    no_color_when_redirected()
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
