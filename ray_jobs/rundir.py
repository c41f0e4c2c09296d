"""The run directory's owner: one driver at a time, and the data it trains on checked and recorded.

``owns_run_dir`` wraps the entry points that own a run (``driver.run_local``, ``train.run_train``). Before
the run starts, in the process that called it (the driver: the ``acodm`` command, a ``ray job submit``
entrypoint, ``acodm proxy``), it

1. takes an exclusive lock on ``<run_dir>/.acodm.lock`` (``envs.filelock``: ``flock``, released on any exit
   including SIGKILL, so never stale). A second ``acodm train`` on the same run directory fails at once,
   naming the holder's PID and host, instead of interleaving its checkpoint writes with the first's. Ray
   Train workers do not take the lock: they write only what their driver's run asks for, and a driver's
   death ends its job's workers (a local Ray is started by the driver and shares its fate; on a cluster
   Ray stops a job's actors and Ray Train workers when its driver exits), so a second driver that gets
   the lock after the first died can overlap with the old workers only while Ray stops them (not
   measured here), never for a whole run;
2. checks the prepared corpus against the config and verifies shard checksums
   (``envs.integrity``: fully up to ``data.verify_max_bytes``, a random sample above);
3. records what the run trains on in ``<run_dir>/corpus.json`` (the corpus's ``content_id``, manifest hash,
   vocabulary), and refuses to resume a run whose corpus has changed since its checkpoints were written
   (it could not continue bit-identically: the same indices would read other tokens).

``runs_using`` lists the runs under an ``output_dir`` that trained on a prepared directory, for
``acodm data prepare``'s refusal to replace it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from envs.filelock import exclusive_lock
from envs.integrity import check_config
from envs.paths import require_absent_or_dir
from envs.shards import read_json, write_json
from ray_jobs.config import ExperimentConfig

log = logging.getLogger(__name__)

LOCK_NAME = ".acodm.lock"
CORPUS_RECORD = "corpus.json"
F = TypeVar("F", bound=Callable[..., Any])


def run_dir_of(cfg: ExperimentConfig, resume: str | os.PathLike[str] | None) -> Path:
    """The directory a run writes: ``--resume RUN_DIR`` if given, else ``<output_dir>/<name>``."""
    return Path(resume) if resume is not None else cfg.run_dir


def owns_run_dir(fn: F) -> F:
    """Run ``fn(cfg, resume=None, **kwargs)`` holding its run directory's lock, after the data checks.

    A ``--resume`` directory that does not exist is left to ``fn`` (which says so); anything else is
    created first, since the lock file lives in it.
    """

    @functools.wraps(fn)
    def owner(cfg: ExperimentConfig, resume: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        run_dir = run_dir_of(cfg, resume)
        if resume is not None and not Path(resume).is_dir():
            return fn(cfg, resume, *args, **kwargs)
        require_absent_or_dir(run_dir, "run directory (output_dir/name)")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(f"cannot create the run directory {str(run_dir)!r}: {exc}") from None
        with exclusive_lock(run_dir / LOCK_NAME, what=f"run directory {run_dir}"):
            check_run_data(cfg, run_dir)
            return fn(cfg, resume, *args, **kwargs)

    return owner  # type: ignore[return-value]


def _has_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(root.glob("step_*/loop.json"))


def check_run_data(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Open and check the prepared corpus for this run, verify shards, and record it in ``corpus.json``.

    Returns:
        The record written to ``<run_dir>/corpus.json``.

    Raises:
        FileNotFoundError / ValueError: the corpus is missing, damaged, or disagrees with the config; or it
            changed since the run's checkpoints were written (naming both ids and the fix).
    """
    from envs.data import PreparedCorpus

    corpus = PreparedCorpus.open(cfg.data.prepared_dir, expected_domains=cfg.data.domain_names)
    check_config(corpus, cfg.data)
    if cfg.data.verify_max_bytes > 0:
        report = corpus.verify(cfg.data.verify_max_bytes)
        log.info("%s: %s", corpus.prepared_dir, report.summary())
    else:
        log.info("%s: shard checksums not verified (data.verify_max_bytes = 0)", corpus.prepared_dir)
    record = {
        "prepared_dir": str(Path(cfg.data.prepared_dir).resolve()),
        "content_id": corpus.content_id,
        "manifest_sha256": corpus.manifest_hash,
        "tokenizer_sha256": corpus.manifest["tokenizer"].get("sha256"),
        "vocab_size": corpus.vocab_size,
        "eos_id": corpus.eos_id,
        "domains": corpus.domain_names,
    }
    path = run_dir / CORPUS_RECORD
    old = read_json(path)
    if old is not None and old.get("content_id") != record["content_id"] and _has_checkpoint(run_dir):
        raise ValueError(
            f"the prepared corpus {record['prepared_dir']} has changed since run {str(run_dir)!r} wrote its "
            f"checkpoints (content id {str(old.get('content_id'))[:12]} in {path}, now {record['content_id'][:12]}; "
            f"it was prepared again or its files were changed), so the run cannot resume on the data it "
            f"trained on. Point data.prepared_dir at the original corpus, or start a new run (--set name=...)"
        )
    write_json(path, record)
    return record


# --------------------------------------------------------------------------------------------- users of a corpus
def _prepared_dir_of(run_dir: Path) -> Path | None:
    record = read_json(run_dir / CORPUS_RECORD)
    if record and isinstance(record.get("prepared_dir"), str):
        return Path(record["prepared_dir"])
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        return Path(data["data"]["prepared_dir"]).resolve()
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def runs_using(prepared_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> list[Path]:
    """Run directories under ``output_dir`` (runs and Tune trials) whose data is ``prepared_dir``.

    Known from each run's ``corpus.json`` (absolute path), else its ``config.yaml`` (``data.prepared_dir``
    resolved against the current directory, as ``acodm`` would). Runs elsewhere are not known.
    """
    target = Path(prepared_dir).resolve()
    root = Path(output_dir)
    if not root.is_dir():
        return []
    candidates = [p for p in root.iterdir() if p.is_dir()]
    candidates += [p for p in root.glob("*/trials/*") if p.is_dir()]
    return sorted(p for p in candidates if _prepared_dir_of(p) == target)


def describe_users(prepared_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> str:
    """A sentence naming the runs that used ``prepared_dir`` (or saying none is known under ``output_dir``)."""
    users = runs_using(prepared_dir, output_dir)
    if not users:
        return f" No run under output_dir {str(output_dir)!r} is known to use it."
    shown = ", ".join(str(p) for p in users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    return f" Runs that trained on it (under output_dir {str(output_dir)!r}): {shown}."

