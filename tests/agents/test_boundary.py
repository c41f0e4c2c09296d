"""``agents`` is pure torch/numpy: importing it pulls in neither Ray, MLflow nor ``envs``."""

from __future__ import annotations

import subprocess
import sys


def test_agents_import_no_ray_mlflow_or_envs() -> None:
    code = (
        "import sys, agents\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'envs'))\n"
        "assert not bad, bad\n"
        "assert agents.__file__.endswith('agents/__init__.py') and '/tests/' not in agents.__file__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
