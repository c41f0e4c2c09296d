"""Checkpoints and the run directory: where a run's state is written, and how a run continues.

A checkpoint is ``<run_dir>/checkpoints/step_<N>/`` (layout in ``docs/internals.md``), written to
``step_<N>.tmp`` and renamed, holding everything needed to continue bit-identically on CPU: the
pretrainer (model, optimizer, schedule, sampler, RNG), the env and probe state, the agent's full
state, the ledger up to the step and the loop's position. A resumed run truncates the ledger to the
checkpoint, so every step appears exactly once. ``prepare_run_dir`` decides whether a run directory
starts afresh or continues, and refuses a config that would change what the run trains.

**Extending a run.** A run under ``optim.schedule: wsd`` also keeps a copy of its checkpoint at the decay
start in ``<run_dir>/stable/step_<N>/`` (never pruned). ``acodm train --resume RUN_DIR`` with another
``train.total_steps`` (the only field that may change besides the execution settings) continues from the
newest checkpoint taken before both the old and the new decay start: the checkpoints after it, the
ledger, the policy and the MLflow run id of the shorter run move to ``<run_dir>/previous/steps_<old>/``
(nothing is deleted), and the continuation logs to a new MLflow run nested under the shorter one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ray_jobs.config import ExperimentConfig, save_config
from ray_jobs.ledger import LEDGER_FILE, Ledger

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STABLE_DIR = "stable"  # wsd runs: the checkpoint at the decay start, kept for extending the run
PREVIOUS_DIR = "previous"  # what an extended run's shorter predecessor left, per its total_steps
EXTENSION_FILE = "extension.json"  # the MLflow run an extension nests under, and where it branched
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
CKPT_VERSION = 1
RESUME_MAY_DIFFER = (
    "ray.", "tracking.", "tune.", "proxy.", "checkpoint.keep_last", "train.log_interval", "data.verify_max_bytes",
)


# --------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    return _step_dirs(Path(run_dir) / CKPT_DIR)


def step_dir_name(step: int) -> str:
    """A checkpoint's directory name, ``step_00000050``: sorts by step, and is Ray Train's name for it too."""
    return f"step_{step:08d}"


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / "loop.json").exists():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory (by step), or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint of a run that loads completely, skipping (and logging) partial ones.

    A checkpoint can be caught half-copied, e.g. when a worker dies while Ray Train persists it.
    """
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return load_checkpoint(path)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None


def write_checkpoint(
    root: Path,
    step: int,
    *,
    pretrainer_state: dict[str, Any],
    env_state: dict[str, Any],
    agent_state: dict[str, Any] | None,
    loop_state: dict[str, Any],
    keep_last: int,
    ledger: Ledger | None = None,
) -> Path:
    """Write ``<root>/step_<N>`` atomically and keep the newest ``keep_last`` (0 = no pruning).

    A copy of the ledger up to this step goes into the checkpoint, so a restart on another node (Ray
    Train restores from storage) recovers the ledger with the rest of the state.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(pretrainer_state, tmp / "pretrainer.pt")
    torch.save(env_state, tmp / "env.pt")
    if agent_state is not None:
        torch.save(agent_state, tmp / "agent.pt")
    if ledger is not None:
        Ledger(tmp / LEDGER_FILE, ledger.rows).flush()
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / "loop.json").write_text(json.dumps({**loop_state, "version": CKPT_VERSION, "files": files}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in _step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_checkpoint_step(cfg: ExperimentConfig, step: int) -> bool:
    """Whether the loop checkpoints after ``step``: every ``checkpoint.interval``, the last step, and a
    ``wsd`` run's decay start (the checkpoint an extension continues from)."""
    from envs.pretrainer import stable_checkpoint_step

    total = cfg.train.total_steps
    return step % cfg.checkpoint.interval == 0 or step >= total or step == stable_checkpoint_step(cfg.optim, total)


def keep_stable_checkpoint(run_dir: Path, path: Path) -> Path:
    """Copy checkpoint ``path`` to ``<run_dir>/stable/<name>`` (atomically), out of reach of pruning."""
    root = Path(run_dir) / STABLE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / Path(path).name, root / f"{Path(path).name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("kept the decay-start checkpoint for extending the run: %s", final)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint directory into ``{"pretrainer", "env", "agent", "loop"}`` with clear errors."""
    path = Path(path)
    loop_file = path / "loop.json"
    if not loop_file.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete or missing (no loop.json)")
    try:
        loop = json.loads(loop_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {str(loop_file)!r} is corrupt: {exc}") from None
    missing = [f for f in loop.get("files", []) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    out: dict[str, Any] = {"loop": loop, "agent": None, "ledger_rows": None}
    if (path / LEDGER_FILE).exists():
        out["ledger_rows"] = Ledger.load(path / LEDGER_FILE).rows
    for key in ("pretrainer", "env", "agent"):
        f = path / f"{key}.pt"
        if not f.exists():
            if key == "agent":
                continue
            raise FileNotFoundError(f"checkpoint {str(path)!r} lacks {f.name}")
        try:
            out[key] = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises several types for truncated/corrupt files
            raise ValueError(f"checkpoint file {str(f)!r} is corrupt or unreadable: {exc}") from None
    return out


def split_env_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move the pretrainer's state out of the env state (it goes to ``pretrainer.pt``, read by export)."""
    backend = dict(state.get("backend") or {})
    pretrainer = backend.pop("pretrainer", None) or {}
    return {**state, "backend": backend}, pretrainer


def join_env_state(env_state: dict[str, Any], pretrainer: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``split_env_state``."""
    if not pretrainer:
        return env_state
    return {**env_state, "backend": {**env_state.get("backend", {}), "pretrainer": pretrainer}}


# --------------------------------------------------------------------------------------------- run directory
def prepare_run_dir(cfg: ExperimentConfig, resume: Path | None) -> tuple[Path, Path | None]:
    """Create or validate the run directory; returns it and the checkpoint to resume from (or None).

    A run directory that already holds a checkpoint is resumed automatically. Its saved config must
    match ``cfg`` except for execution settings (``ray.*``, ``tracking.*``, ...), so a resumed run
    cannot silently change what it trains.
    """
    run_dir = Path(resume) if resume is not None else cfg.run_dir
    if resume is not None and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: no such run directory")
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume is not None and ckpt is None:
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: the run directory holds no complete checkpoint")
    saved = run_dir / "config.yaml"
    if saved.exists():
        from ray_jobs.config import flatten, load_saved_config

        old = flatten(load_saved_config(saved))
        new = flatten(cfg)
        differ = sorted(
            k for k in set(old) | set(new)
            if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_DIFFER) and k not in ("name", "output_dir")
        )
        if differ == ["train.total_steps"]:
            ckpt = _extend(run_dir, load_saved_config(saved), cfg, resume is not None)
        elif differ:
            raise ValueError(
                f"run directory {str(run_dir)!r} was started with a different config; differing fields: "
                f"{differ}. Use a new name (--set name=...) or the same config."
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    except OSError as exc:
        raise PermissionError(f"cannot write the run directory {str(run_dir)!r}: {exc}") from None
    return run_dir, ckpt


# --------------------------------------------------------------------------------------------- extending
def _extend(run_dir: Path, old: ExperimentConfig, new: ExperimentConfig, explicit: bool) -> Path:
    """Prepare ``run_dir`` to continue under ``new.train.total_steps``; returns the checkpoint to resume.

    The rule (README, "Extending a run"): only ``train.total_steps`` changes, the schedule is ``wsd``, the
    request is explicit (``--resume``), and some checkpoint was taken before both decay starts; every
    step up to it had the same LR under either horizon. Raises ``ValueError`` naming what stops it.
    """
    from envs.pretrainer import stable_checkpoint_step

    before, after = old.train.total_steps, new.train.total_steps
    where = f"run directory {str(run_dir)!r}"
    if old.optim.schedule != "wsd":
        raise ValueError(
            f"{where} trained with optim.schedule={old.optim.schedule!r}, whose LR at every step depends on "
            f"train.total_steps ({before}), so it cannot be continued to {after} steps. Start a new run "
            "(--set name=...); to be able to extend it later, use optim.schedule: wsd."
        )
    if not explicit:
        raise ValueError(
            f"{where} was started with train.total_steps={before}, not {after}. To extend this wsd run, "
            f"ask for it: acodm train ... --resume {run_dir}; or use a new name (--set name=...)."
        )
    limit = min(stable_checkpoint_step(old.optim, before) or 0, stable_checkpoint_step(new.optim, after) or 0)
    candidates = [p for p in checkpoint_dirs(run_dir) + _step_dirs(run_dir / STABLE_DIR) if _step(p) <= limit]
    if not candidates:
        raise ValueError(
            f"{where}: no checkpoint from before step {limit} (the decay start of train.total_steps={before} "
            f"or of {after}, whichever is first) to continue from; the decay-start checkpoint is kept in "
            f"{STABLE_DIR}/ by runs that reach it."
        )
    branch = max(candidates, key=_step)
    archive = _archive_previous(run_dir, before, _step(branch))
    ckpt_root = run_dir / CKPT_DIR
    target = ckpt_root / branch.name
    if branch.parent != ckpt_root:
        tmp = ckpt_root / f"{branch.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(branch, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    log.info("extending %s from %d to %d steps: continuing from checkpoint step %d; the %d-step run's later "
             "checkpoints, ledger, policy and MLflow run id are in %s", run_dir, before, after, _step(branch),
             before, archive)
    return target


def _step(path: Path) -> int:
    return int(path.name[5:])


def _archive_previous(run_dir: Path, total_steps: int, branch_step: int) -> Path:
    """Move what belongs to the shorter run aside into ``previous/steps_<total_steps>/`` and record the
    extension (idempotent, so an extension interrupted half-way can simply be asked for again)."""
    archive = run_dir / PREVIOUS_DIR / f"steps_{total_steps}"
    (archive / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", LEDGER_FILE):
        if (run_dir / name).exists() and not (archive / name).exists():
            shutil.copy2(run_dir / name, archive / name)
    from ray_jobs.tracking import RUN_ID_FILE

    for path in (run_dir / "policy.pt", run_dir / RUN_ID_FILE, run_dir / CKPT_DIR / RAY_SNAPSHOT):
        if path.exists():
            os.replace(path, archive / path.name)
    for path in checkpoint_dirs(run_dir):
        if _step(path) > branch_step:
            os.replace(path, archive / CKPT_DIR / path.name)
    record = {"previous_total_steps": total_steps, "branch_step": branch_step, "archive": str(archive)}
    if (archive / RUN_ID_FILE).exists():
        record["previous_mlflow"] = json.loads((archive / RUN_ID_FILE).read_text())
    tmp = run_dir / f".{EXTENSION_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / EXTENSION_FILE)
    return archive
