"""A local Ray started by ``acodm`` listens on loopback only, and keeps Ray's token authentication.

The README promised a local Ray bound to 127.0.0.1, but ``ray.init(_node_ip_address="127.0.0.1")`` on
Ray 2.60 registered the node under the machine's outward address and its GCS, raylet and worker gRPC
servers listened on every interface (``::``); ``ray_jobs.cluster.loopback_only`` fixes it. The probe runs
in a child process so that it starts its own Ray, exactly as ``acodm train`` does (dashboard included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_jobs.sockets import is_loopback

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys, time, urllib.error, urllib.request
import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from ray_jobs.cluster import connect
from tests.ray_jobs.ray_helpers import tiny_config
from tests.ray_jobs.sockets import listening_sockets, process_tree

@ray.remote(num_cpus=0)
class Echo:
    def ping(self):
        return os.getpid()

def snapshot(tag):
    actor = Echo.remote()
    ray.get([actor.ping.remote(), ray.remote(lambda: 1).remote()])  # a worker and an actor are up
    time.sleep(2)  # the dashboard agent opens its ports shortly after the node registers
    ctx = ray.get_runtime_context()
    try:  # the dashboard without the token: refused when token authentication is on
        status = urllib.request.urlopen(f"http://{ray._private.worker.get_dashboard_url()}/api/version", timeout=10).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return {"tag": tag, "sockets": listening_sockets(process_tree(os.getpid())),
            "nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "gcs": ctx.gcs_address,
            "token_auth": is_token_auth_enabled(), "dashboard_status": status}

out = []
with connect(tiny_config(sys.argv[1]), include_dashboard=True) as address:
    assert address is None
    out.append(snapshot("acodm"))
if "--compare" in sys.argv:  # the call acodm made before issue 15, for the record
    ray.init(num_cpus=1, include_dashboard=True, _node_ip_address="127.0.0.1", configure_logging=False)
    out.append(snapshot("plain ray.init"))
    ray.shutdown()
print(json.dumps(out))
"""


def _probe(tmp_path: Path, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    (ours, plain) = _probe(tmp_path, "--compare")
    servers = {s["process"] for s in ours["sockets"]}
    assert {"gcs_server", "raylet"} <= servers, ours["sockets"]  # the probe sees Ray's servers at all
    exposed = [s for s in ours["sockets"] if not is_loopback(str(s["ip"]))]
    assert exposed == [], f"a local Ray socket listens beyond loopback: {exposed}"
    assert ours["nodes"] == ["127.0.0.1"] and ours["gcs"].startswith("127.0.0.1:")
    assert ours["token_auth"] is True and ours["dashboard_status"] == 401
    # What the plain call does on Ray 2.60 (the reason for loopback_only): if a Ray upgrade makes this
    # loopback too, loopback_only can go.
    assert any(not is_loopback(str(s["ip"])) for s in plain["sockets"]), plain["sockets"]
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # nothing leaks into the caller
