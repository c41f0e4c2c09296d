"""Package boundaries: ``envs`` and ``agents`` never import Ray or MLflow, ``analysis`` never imports Ray,
``agents`` never imports ``envs``, and neither ``envs`` nor ``agents`` imports the orchestration layer.

Each check runs in a fresh interpreter, imports every module of the packages (found with pkgutil, so new
modules are covered automatically) and inspects ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    packages = sys.argv[1].split(",")
    imported = []
    for name in packages:
        pkg = importlib.import_module(name)
        imported.append(name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    roots = sorted({m.split(".")[0] for m in sys.modules})
    print(json.dumps({"imported": imported, "roots": roots}))
    """
)


def _import_all(*packages: str, path: Path = REPO) -> tuple[list[str], set[str]]:
    """Import ``packages`` and all their submodules in a subprocess; return (modules, top-level roots loaded)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(packages)],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(path)},
    )
    assert proc.returncode == 0, f"importing {packages} failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["imported"], set(out["roots"])


@pytest.mark.slow
def test_envs_and_agents_import_neither_ray_nor_mlflow():
    imported, roots = _import_all("envs", "agents")
    assert "envs.sampler" in imported and "agents.config" in imported  # the walk really found the modules
    assert "ray" not in roots, "an envs/agents module imports ray"
    assert "mlflow" not in roots, "an envs/agents module imports mlflow"
    assert "ray_jobs" not in roots, "envs/agents must not import the orchestration layer"


def test_agents_do_not_import_envs():
    imported, roots = _import_all("agents")
    assert "agents.config" in imported
    assert not {"envs", "ray", "mlflow", "ray_jobs"} & roots, sorted(
        {"envs", "ray", "mlflow", "ray_jobs"} & roots
    )


def test_analysis_never_imports_ray():
    imported, roots = _import_all("analysis")
    assert imported[0] == "analysis"
    assert "ray" not in roots, "an analysis module imports ray"


def test_the_probe_sees_imports_made_by_nested_submodules(tmp_path):
    (tmp_path / "fakepkg" / "sub").mkdir(parents=True)
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "sub" / "deep.py").write_text("import xml.dom.minidom\n")
    imported, roots = _import_all("fakepkg", path=tmp_path)
    assert imported == ["fakepkg", "fakepkg.sub", "fakepkg.sub.deep"]
    assert {"fakepkg", "xml"} <= roots
