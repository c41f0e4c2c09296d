"""The import contract between packages, checked statically so that lazy imports count too.

``envs`` and ``agents`` never import Ray, MLflow or ``ray_jobs`` (not even inside a function, under
``TYPE_CHECKING`` or through ``importlib``); ``agents`` never imports ``envs``; ``analysis`` never
imports Ray or ``ray_jobs``. A runtime check (import everything, look at ``sys.modules``) cannot see an
import inside a function, so every ``import``/``from ... import`` statement and every string literal
passed to ``importlib.import_module``/``__import__`` anywhere in a module's syntax tree is read here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "envs": {"ray", "mlflow", "ray_jobs", "analysis", "agents"},
    "agents": {"ray", "mlflow", "ray_jobs", "analysis", "envs"},
    "analysis": {"ray", "ray_jobs"},
}


def imported_roots(source: str, filename: str = "<string>") -> dict[str, int]:
    """Top-level package of every import in ``source`` (any depth: functions, classes, branches), with the
    line of its first occurrence. Relative imports are skipped (they stay inside the package)."""
    roots: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        if name:
            roots.setdefault(name.split(".")[0], line)

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            add(node.module, node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                add(node.args[0].value, node.lineno)
    return roots


def violations(package: str, forbidden: set[str], root: Path = REPO) -> list[str]:
    """``file:line imports X`` for every forbidden import in ``package``'s modules."""
    files = sorted((root / package).rglob("*.py"))
    assert files, f"no modules found under {root / package}"
    found = []
    for path in files:
        roots = imported_roots(path.read_text(), str(path))
        for name, line in sorted(roots.items(), key=lambda item: item[1]):
            if name in forbidden:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_import_contract(package: str) -> None:
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_sees_lazy_typing_and_importlib_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "envs"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ray_jobs.config import ExperimentConfig\n"
        "def f():\n    import ray.train\n    return ray\n"
        "class C:\n    def g(self):\n        import importlib\n        return importlib.import_module('mlflow.tracking')\n"
        "x = __import__('analysis')\n"
    )
    found = violations("envs", FORBIDDEN["envs"], root=tmp_path)
    assert found == [
        "envs/sub/deep.py:3 imports ray_jobs",
        "envs/sub/deep.py:5 imports ray",
        "envs/sub/deep.py:10 imports mlflow",
        "envs/sub/deep.py:11 imports analysis",
    ]
