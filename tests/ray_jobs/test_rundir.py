"""One driver per run directory, the data a run trains on checked and recorded, paths that stay put.

Before issue 15 two ``acodm train`` commands on one run directory interleaved their checkpoint writes, a
run trained on shards whose bytes had changed, ``data.tokenizer.vocab_size`` could disagree with the
corpus, ``name: ../../escape`` wrote outside ``output_dir``, and several path mistakes got misleading
messages. Each test here failed (or the command exited 0) on the code before the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from envs.filelock import DirectoryLockedError, exclusive_lock, lock_holder
from ray_jobs.checkpoints import latest_checkpoint
from ray_jobs.cli import main
from ray_jobs.config import ExperimentConfig
from ray_jobs.driver import run_local
from ray_jobs.rundir import CORPUS_RECORD, LOCK_NAME, runs_using
from tests.conftest import REPO
from tests.conftest import experiment as shared_experiment

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def own_corpus(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the corpus, to change."""
    return Path(shutil.copytree(prepared, tmp_path / "prepared"))


def experiment(prepared: Path, out: Path, **over: Any) -> dict[str, Any]:
    """The shared tiny in-process experiment, 8 steps."""
    return shared_experiment(prepared, out, **{"train.total_steps": 8, **over})


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def acodm(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ray_jobs", "-q", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _mark_trained(prepared: Path, requested: int) -> None:
    """Make a synthetic corpus look like one ``acodm data prepare`` trained a BPE for (``requested`` tokens)."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["tokenizer"] |= {"trained": True, "requested_vocab_size": requested, "eos_token": "<|endoftext|>"}
    (prepared / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------- the lock
def test_run_refused_while_another_process_holds_the_run_directory(prepared, tmp_path):
    cfg = ExperimentConfig.from_dict(experiment(prepared, tmp_path))
    cfg.run_dir.mkdir(parents=True)
    with exclusive_lock(cfg.run_dir / LOCK_NAME, what="test holder"):
        with pytest.raises(DirectoryLockedError, match=rf"run directory .*/t is in use by PID {os.getpid()} on host"):
            run_local(cfg)
        from ray_jobs.train import run_train

        # the Ray Train path takes the same lock in the driver, before it starts or connects to Ray
        with pytest.raises(DirectoryLockedError, match=rf"is in use by PID {os.getpid()}"):
            run_train(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": True})}))
    assert not (cfg.run_dir / "config.yaml").exists()  # refused before anything was written
    run_local(cfg)  # released: the run goes ahead
    assert lock_holder(cfg.run_dir / LOCK_NAME)["pid"] == os.getpid()


@pytest.mark.slow
def test_second_train_command_names_the_first_and_a_sigkill_leaves_no_stale_lock(prepared, tmp_path):
    steps = 60
    cfg_path = write_config(tmp_path / "exp.yaml", experiment(prepared, tmp_path / "runs", **{
        "train.total_steps": steps, "checkpoint.interval": 4, "checkpoint.keep_last": 10}))  # fmt: skip
    run_dir = tmp_path / "runs" / "t"
    first = subprocess.Popen([sys.executable, "-m", "ray_jobs", "-q", "train", str(cfg_path)], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_00000004").exists():  # mid-run, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before step 4"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the lock, for as long as we need
        # a second command on the same run directory, through the Ray Train path and the in-process path
        for extra in (["--set", "ray.enabled=true"], []):
            second = acodm("train", str(cfg_path), *extra)
            assert second.returncode == 2, second.stderr
            assert f"run directory {run_dir} is in use by PID {first.pid} on host" in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the first run finished before it could be killed"
    killed_at = int(latest_checkpoint(run_dir).name[5:])
    assert killed_at < steps
    resumed = acodm("train", str(cfg_path))  # no stale lock after SIGKILL: resumes at once
    assert resumed.returncode == 0, resumed.stderr
    assert list(pd.read_parquet(run_dir / "ledger.parquet")["step"]) == list(range(steps + 1))


# --------------------------------------------------------------------------------------------- the data
def test_shard_with_changed_bytes_stops_the_run_before_training(own_corpus, tmp_path):
    _flip_byte(own_corpus / "beta" / "train_00001.bin")
    cfg_path = write_config(tmp_path / "exp.yaml", experiment(own_corpus, tmp_path / "runs"))
    result = acodm("train", str(cfg_path))
    assert result.returncode == 2, result.stderr
    assert "beta/train_00001.bin does not match the sha256 in the manifest (domain 'beta', train)" in result.stderr
    assert not (tmp_path / "runs" / "t" / "ledger.parquet").exists()


def test_verify_budget_zero_skips_shard_hashing(own_corpus, tmp_path, caplog):
    _flip_byte(own_corpus / "beta" / "train_00001.bin")
    caplog.set_level("INFO", logger="ray_jobs.rundir")
    run_local(ExperimentConfig.from_dict(experiment(own_corpus, tmp_path, **{"data.verify_max_bytes": 0})))
    assert "shard checksums not verified (data.verify_max_bytes = 0)" in caplog.text  # documented opt-out


def test_vocab_size_disagreeing_with_the_corpus_is_refused(own_corpus, tmp_path):
    _mark_trained(own_corpus, requested=300)  # a BPE asked for 300 tokens that stopped at the corpus's 96
    cfg_path = write_config(tmp_path / "exp.yaml", experiment(own_corpus, tmp_path / "runs"))  # default 8192
    result = acodm("train", str(cfg_path))
    assert result.returncode == 2, result.stderr
    assert "data.tokenizer.vocab_size = 8192 but prepared corpus" in result.stderr
    assert "set data.tokenizer.vocab_size: 300" in result.stderr
    assert not (tmp_path / "runs" / "t" / "config.yaml").exists()  # no record of a value the model does not use
    data = experiment(own_corpus, tmp_path / "runs", **{"data.tokenizer": {"vocab_size": 300}})
    run_local(ExperimentConfig.from_dict(data))
    record = json.loads((tmp_path / "runs" / "t" / CORPUS_RECORD).read_text())
    assert record["vocab_size"] == 96 and record["prepared_dir"]  # what the model was built for == str(own_corpus.resolve())


def test_resume_on_a_changed_corpus_is_refused(own_corpus, tmp_path):
    cfg = ExperimentConfig.from_dict(experiment(own_corpus, tmp_path))
    run_local(cfg)
    run_local(cfg)  # the same data: a finished run resumes (and has nothing left to do)
    # prepared again with other data: a shard and its sha256 both change, the manifest is consistent
    shard = own_corpus / "gamma" / "train_00000.bin"
    _flip_byte(shard)
    manifest = json.loads((own_corpus / "manifest.json").read_text())
    import hashlib

    manifest["domains"][2]["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (own_corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the prepared corpus .* has changed since run '.*/t' wrote its checkpoints "
                                         r"\(content id [0-9a-f]{12} in .*corpus.json, now [0-9a-f]{12}"):  # fmt: skip
        run_local(cfg)
    fresh = ExperimentConfig.from_dict(experiment(own_corpus, tmp_path, name="t2"))
    run_local(fresh)  # a new run on the new data is fine


# --------------------------------------------------------------------------------------------- prepare: who used it
def test_prepare_refusal_names_the_runs_that_used_the_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name} words {i} " * 12}) + "\n" for i in range(40)))  # fmt: skip
    base = {"name": "r1", "output_dir": "runs", "lm": {"seq_len": 8},
            "data": {"prepared_dir": "prep", "tokenizer": {"vocab_size": 300}, "num_proc": 1,
                     "domains": [{"name": n, "source": {"paths": [f"{n}.jsonl"]}} for n in ("a", "b")]}}  # fmt: skip
    write_config(tmp_path / "ab.yaml", base)
    assert main(["-q", "data", "prepare", "ab.yaml"]) == 0
    for run, cfg_dir in (("r1", "prep"), ("r2", str(tmp_path / "prep")), ("other", "elsewhere")):
        (tmp_path / "runs" / run).mkdir(parents=True)
        write_config(tmp_path / "runs" / run / "config.yaml", {**base, "data": {**base["data"], "prepared_dir": cfg_dir}})
    assert runs_using("prep", "runs") == [Path("runs/r1"), Path("runs/r2")]
    abc = {**base, "data": {**base["data"], "domains": [*base["data"]["domains"],
                                                         {"name": "c", "source": {"paths": ["c.jsonl"]}}]}}  # fmt: skip
    write_config(tmp_path / "abc.yaml", abc)
    assert main(["-q", "data", "prepare", "abc.yaml"]) == 2
    err = capsys.readouterr().err
    assert "prep already holds a prepared corpus that differs from this config: its domains are ['a', 'b']" in err
    assert "Runs that trained on it (under output_dir 'runs'): runs/r1, runs/r2." in err
    assert main(["-q", "data", "prepare", "abc.yaml", "--force"]) == 0


def test_data_verify_command(prepared, tmp_path, capsys):
    assert main(["data", "verify", str(prepared)]) == 0
    assert "OK, full shard check: 15/15 shards, 43.2/43.2 kB match their sha256" in capsys.readouterr().out
    broken = Path(shutil.copytree(prepared, tmp_path / "p"))
    _flip_byte(broken / "alpha" / "val_00000.bin")
    assert main(["data", "verify", str(broken)]) == 2
    assert "alpha/val_00000.bin does not match the sha256 in the manifest" in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path / "nothing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "x\\y"])
def test_run_name_that_is_not_one_path_component_is_refused(prepared, tmp_path, name):
    cfg_path = write_config(tmp_path / "exp.yaml", experiment(prepared, tmp_path / "out" / "runs", name=name))
    assert main(["train", str(cfg_path)]) == 2
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "escape").exists()


def test_run_name_message(prepared, tmp_path, capsys):
    cfg_path = write_config(tmp_path / "exp.yaml", experiment(prepared, tmp_path, name="../../escape"))
    assert main(["train", str(cfg_path)]) == 2
    assert ("name = '../../escape': Value error, name '../../escape' contains a path separator: it must be a single "
            "path component") in capsys.readouterr().err  # fmt: skip


def test_run_directory_that_is_a_file_says_so(prepared, tmp_path, capsys):
    (tmp_path / "t").write_text("a file where the run directory goes")
    assert main(["train", str(write_config(tmp_path / "exp.yaml", experiment(prepared, tmp_path)))]) == 2
    assert f"run directory (output_dir/name) '{tmp_path / 't'}' is an existing file, not a directory" in (
        capsys.readouterr().err
    )


def test_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert f"config file '{tmp_path}' is a directory; expected a YAML file" in capsys.readouterr().err


def test_demo_onto_an_existing_file_says_so(tmp_path, capsys):
    target = tmp_path / "demo"
    target.write_text("keep me")
    assert main(["data", "demo", str(target)]) == 2
    assert f"demo corpus directory '{target}' is an existing file, not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_report_out_onto_an_existing_file_says_so_before_writing(tmp_path, capsys):
    out = tmp_path / "report"
    out.write_text("keep me")
    assert main(["report", str(tmp_path / "no-such-run"), "--out", str(out)]) == 2
    assert f"report --out '{out}' is an existing file, not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["report", str(tmp_path / "no-such-run"), "--out", str(out / "sub")]) == 2
    assert f"'{out}' is a file, not a directory" in capsys.readouterr().err
