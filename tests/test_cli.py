"""The ``acodm`` command line: help for every command, and user errors as one message with exit code 2."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_jobs.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("data", "train", "tune", "proxy", "report", "export")
HELP_PATHS = [
    ["data"],
    ["data", "demo"],
    ["data", "prepare"],
    ["train"],
    ["tune"],
    ["proxy"],
    ["report"],
    ["export"],
]


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits for --help and usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"domains": [{"name": n, "source": {"paths": [f"{n}.jsonl"]}} for n in ("a", "b")]},
                "lm": {"seq_len": 128, "layerz": 3},
            }
        )
    )
    return path


def test_console_script_is_registered():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [ep.value for ep in scripts if ep.name == "acodm"] == ["ray_jobs.cli:console_main"]


def test_top_level_help_lists_every_subcommand(capsys):
    code, out, _ = _run_main(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: acodm")
    for name in SUBCOMMANDS:
        assert f"    {name} " in out, f"{name} missing from:\n{out}"


@pytest.mark.parametrize("argv", HELP_PATHS, ids=" ".join)
def test_every_subcommand_has_help(argv, capsys):
    code, out, _ = _run_main([*argv, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: acodm {' '.join(argv)}")
    parser_help = out.split("\n\n", 1)[1]
    assert len(parser_help.strip()) > 0


@pytest.mark.parametrize("argv", [["train"], ["tune"], ["proxy"], ["data", "prepare"]], ids=" ".join)
def test_config_commands_document_config_and_set(argv, capsys):
    _, out, _ = _run_main([*argv, "--help"], capsys)
    assert "config" in out and "--set KEY=VALUE" in out


def test_parser_knows_exactly_the_documented_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert tuple(sub.choices) == SUBCOMMANDS


def test_no_command_is_a_usage_error(capsys):
    code, _, err = _run_main([], capsys)
    assert code == 2 and "required: COMMAND" in err


@pytest.mark.parametrize("command", [["train"], ["tune"], ["proxy"], ["data", "prepare"]], ids=" ".join)
def test_bad_config_exits_2_naming_the_field(command, tmp_path, capsys):
    code, _, err = _run_main([*command, str(_bad_config(tmp_path))], capsys)
    assert code == 2
    assert "lm.layerz: unknown key" in err and "bad.yaml" in err
    assert "Traceback" not in err


def test_bad_override_exits_2_naming_the_field(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text((REPO / "configs" / "demo.yaml").read_text())
    code, _, err = _run_main(["train", str(good), "--set", "agent.gamma=1.5"], capsys)
    assert code == 2 and "agent.gamma = 1.5: Input should be less than 1" in err
    code, _, err = _run_main(["train", str(good), "--set", "agent.gama=0.5"], capsys)
    assert code == 2 and "agent.gama: unknown key" in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, _, err = _run_main(["train", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml' does not exist" in err and "Traceback" not in err


def test_debug_flag_shows_the_exception(tmp_path):
    from ray_jobs.config import ConfigError

    with pytest.raises(ConfigError, match=r"lm\.layerz: unknown key"):
        main(["--debug", "train", str(_bad_config(tmp_path))])


def test_module_entry_point_bad_config_in_a_subprocess(tmp_path):
    """What a user sees: ``python -m ray_jobs`` (the console script's target) prints one message, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs", "train", str(_bad_config(tmp_path))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("acodm: error: invalid config")
    assert "lm.layerz: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_module_entry_point_help_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and all(name in proc.stdout for name in SUBCOMMANDS)


def test_run_summary_hints_name_commands_that_run_as_printed(tmp_path, capsys):
    import shutil

    from ray_jobs.cli import print_run_summary
    from ray_jobs.config import ExperimentConfig
    from tests.conftest import experiment

    cfg = ExperimentConfig.from_dict(experiment(tmp_path, tmp_path, **{"tracking.enabled": True}))
    print_run_summary(cfg, {"run_dir": str(tmp_path / "t"), "eval": {"val/mean_ppl": 12.5}})
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in capsys.readouterr().out.splitlines()}
    for key, name in (("report", "acodm"), ("MLflow", "mlflow")):
        exe = lines[key].split()[0]
        assert exe.endswith(name) and shutil.which(exe) is not None, lines[key]
    assert lines["report"].split()[1:] == ["report", str(tmp_path / "t"), "--out", str(tmp_path / "t" / "report")]
