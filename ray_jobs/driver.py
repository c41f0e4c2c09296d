"""The run loop: env + mixer + ledger + validation + checkpoints + metrics, shared by every mode.

``RunLoop`` is one pretraining run seen from one process. In-process (``ray.enabled=false``, the
debugging path) it is the whole run; inside a Ray Train worker every rank runs it collectively (SPMD):
rank 0 asks the mixer (in-process, or ``ray_jobs.agent_actor.ActingMixer`` for AC-ODM) for the weights
and broadcasts them, all ranks step the env together, rank 0 observes, records and checkpoints
(``ray_jobs.checkpoints``). Also here: the builders both paths share and ``run_local``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import Transition
from envs.pretrainer import stable_checkpoint_step
from ray_jobs.checkpoints import (
    CKPT_DIR,
    is_checkpoint_step,
    join_env_state,
    keep_stable_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    split_env_state,
    write_checkpoint,
)
from ray_jobs.config import ExperimentConfig
from ray_jobs.ledger import LEDGER_FILE, Ledger, signals_row
from ray_jobs.progress import PACKAGE_LOGGERS, ProgressLine, si
from ray_jobs.rundir import owns_run_dir

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class LoopHooks:
    """Optional callbacks the Ray layer plugs in.

    ``on_report(step, metrics, checkpoint_dir)`` runs on every rank at each evaluation and checkpoint
    step (the same steps on all ranks, as Ray Train's collective ``report`` requires); rank 0 gets
    the checkpoint directory it just wrote (None on other ranks and on eval-only steps).
    """

    on_report: Callable[[int, dict[str, float], Path | None], None] | None = None
    checkpoint_root: Path | None = None  # None: <run_dir>/checkpoints with keep_last pruning
    # rank 0's progress line, made from (total, initial step, log interval): None = a ProgressLine here
    progress: Callable[[int, int, int], Any] | None = None


class RunLoop:
    """One run of ``env`` steered by ``mixer``; see the module docstring."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        env: Any,
        mixer: Any | None,
        run_dir: Path,
        *,
        sink: Any | None = None,
        rank: int = 0,
        world_size: int = 1,
        hooks: LoopHooks | None = None,
    ) -> None:
        """Wire a run; ``mixer`` and ``sink`` are only needed on rank 0."""
        if rank == 0 and mixer is None:
            raise ValueError("rank 0 needs a mixer")
        self.cfg = cfg
        self.env = env
        self.mixer = mixer
        self.run_dir = Path(run_dir)
        self.sink = sink
        self.rank = rank
        self.world_size = world_size
        self.hooks = hooks or LoopHooks()
        self.domain_names = list(cfg.data.domain_names)
        self.ledger = Ledger(self.run_dir / LEDGER_FILE)
        self.step = 0
        self.tokens_total = 0
        self.wall_offset = 0.0
        self.obs: np.ndarray | None = None
        self._prev_tokens = 0
        # per-step metrics since the last sink batch: MLflow gets their mean over the logging interval
        self._window: dict[str, list[float]] = {}
        self._domain_tokens = dict.fromkeys(self.domain_names, 0)
        self._skipped_total = 0
        self._train_tokens = domain_train_tokens(cfg.data.prepared_dir, self.domain_names)
        self._flops: float | None = None
        per_device = cfg.tracking.peak_tflops or known_peak_tflops()
        self._peak_tflops = per_device * world_size if per_device else None  # tokens/s counts every rank

    @property
    def backend(self) -> Any:
        """The env's trainer backend (``LMBackend`` or ``SimulatedBackend``)."""
        return self.env.unwrapped.backend

    # ---------------------------------------------------------------- state
    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint (all ranks call this with the same data)."""
        loop = ckpt["loop"]
        self.env.reset(seed=self.cfg.seed)
        self.env.unwrapped.load_state_dict(join_env_state(ckpt["env"], ckpt["pretrainer"]))
        if self.rank == 0:
            if ckpt["agent"] is not None:
                self.mixer.load_state_dict(ckpt["agent"])
            rows = ckpt["ledger_rows"]
            if rows is None:  # older checkpoints: the run directory's ledger, truncated
                rows = Ledger.load(self.run_dir / LEDGER_FILE).rows
            self.ledger = Ledger(self.run_dir / LEDGER_FILE, rows)
            self.ledger.truncate(int(loop["ledger_rows"]))
            for row in self.ledger.rows:  # running totals the MLflow metrics continue from
                for name in self.domain_names:
                    self._domain_tokens[name] += int(row.get(f"tokens/{name}") or 0)
                self._skipped_total += int(bool(row.get("skipped")))
        self.step = int(loop["step"])
        self.tokens_total = int(loop["tokens"])
        self.wall_offset = float(loop["wall_time"])
        self.obs = np.asarray(loop["obs"], dtype=np.float32)
        log.info("resumed at step %d from checkpoint", self.step)

    def checkpoint(self, wall_time: float) -> Path | None:
        """Rank 0 writes a checkpoint of everything; other ranks return None."""
        if self.rank != 0:
            return None
        self.ledger.flush()
        agent_state = self.mixer.state_dict() if self.mixer is not None else None
        env_state, pretrainer_state = split_env_state(self.env.unwrapped.state_dict())
        path = write_checkpoint(
            self.hooks.checkpoint_root or self.run_dir / CKPT_DIR,
            self.step,
            pretrainer_state=pretrainer_state,
            env_state=env_state,
            agent_state=agent_state,
            loop_state={
                "step": self.step,
                "tokens": self.tokens_total,
                "wall_time": wall_time,
                "ledger_rows": len(self.ledger),
                "obs": np.asarray(self.obs, dtype=float).tolist(),
            },
            keep_last=self.cfg.checkpoint.keep_last if self.hooks.checkpoint_root is None else 0,
            ledger=self.ledger,
        )
        if self.hooks.checkpoint_root is None:
            log.info("checkpoint step %d -> %s", self.step, path)
        else:  # staged for Ray Train, which persists it (on_report says where)
            log.debug("checkpoint step %d staged in %s", self.step, path)
        return path

    # ---------------------------------------------------------------- helpers
    def _broadcast_weights(self, weights_K: np.ndarray | None) -> np.ndarray:
        """Rank 0's weights on every rank (one small broadcast per decision)."""
        if self.world_size == 1:
            assert weights_K is not None
            return weights_K
        import torch.distributed as dist

        buf = torch.zeros(len(self.domain_names), dtype=torch.float64)
        if self.rank == 0:
            buf.copy_(torch.from_numpy(np.array(weights_K, dtype=np.float64)))
        dist.broadcast(buf, src=0)
        return buf.numpy()

    def _accumulate(self, row: dict[str, Any], agent_metrics: dict[str, float]) -> None:
        """Add one step's metrics to the logging window, and the step's tokens to the running totals."""
        for key, value in self._metrics(row, agent_metrics).items():
            if not key.startswith("val/"):
                self._window.setdefault(key, []).append(value)
        for name in self.domain_names:
            self._domain_tokens[name] += int(row.get(f"tokens/{name}") or 0)
        self._skipped_total += int(bool(row.get("skipped")))

    def _window_metrics(self, row: dict[str, Any]) -> dict[str, float]:
        """What one sink batch holds: the mean of every per-step metric over the steps since the last batch
        (not one step's value, which a noisy loss makes misleading), plus running totals and evaluations."""
        out = {k: float(np.mean(v)) for k, v in self._window.items() if v}
        self._window.clear()
        out["lm/skipped_steps"] = float(self._skipped_total)
        out["data/tokens"] = float(self.tokens_total)
        for name in self.domain_names:
            out[f"data/tokens/{name}"] = float(self._domain_tokens[name])
            if self._train_tokens and self._train_tokens.get(name):
                out[f"data/epochs/{name}"] = self._domain_tokens[name] / self._train_tokens[name]
        out.update({k: float(v) for k, v in row.items() if k.startswith("val/") and _finite(v)})
        return out

    def _metrics(self, row: dict[str, Any], agent_metrics: dict[str, float]) -> dict[str, float]:
        """Namespaced metrics of one step, from its ledger row."""
        out: dict[str, float] = {"lm/loss": row["loss"], "lm/lr": row["lr"], "env/reward": row["reward"],
                                 "lm/grad_norm": row.get("grad_norm", math.nan)}
        weights = np.array([row[f"weight/{name}"] for name in self.domain_names], dtype=float)
        positive = weights[weights > 0]
        out["mix/entropy"] = float(-(positive * np.log(positive)).sum())  # nats; log(K) = uniform
        for name in self.domain_names:
            out[f"lm/loss/{name}"] = row[f"loss/{name}"]
            out[f"mix/weight/{name}"] = row[f"weight/{name}"]
            if f"score/{name}" in row:
                out[f"env/score/{name}"] = row[f"score/{name}"]
        for key, value in row.items():
            if key.startswith("val/"):
                out[key] = value
        out.update(agent_metrics)
        for key, seconds in row.items():  # per-phase timings: data, forward_backward, probe, optimizer, agent
            if key.startswith("time/") and key.endswith("_s"):
                out[f"perf/{key[5:]}"] = seconds
        tokens_per_s = self._tok_s(row)
        out["perf/tokens_per_s"] = tokens_per_s
        if self._flops_per_token:
            out["perf/model_tflops"] = tokens_per_s * self._flops_per_token / 1e12
            if self._peak_tflops:
                out["perf/mfu"] = out["perf/model_tflops"] / self._peak_tflops
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    @property
    def _flops_per_token(self) -> float | None:
        """The model's FLOPs per token (``Pretrainer.flops_per_token``), once; None without an LM."""
        if self._flops is None:
            pretrainer = getattr(self.backend, "pretrainer", None)
            self._flops = pretrainer.flops_per_token() if pretrainer is not None else 0.0
        return self._flops or None

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train until the budget; returns the final evaluation and the run directory."""
        cfg = self.cfg
        total = cfg.train.total_steps
        if self.obs is None:
            self.obs, _ = self.env.reset(seed=cfg.seed)
        start = time.perf_counter() - self.wall_offset
        last_eval: dict[str, float] = self._evaluate_initial(start) if self.step == 0 else {}
        progress = self.hooks.progress or ProgressLine
        bar = progress(total, self.step, cfg.train.log_interval) if self.rank == 0 else None
        while self.step < total:
            t0 = time.perf_counter()
            weights_K = self.mixer.act(self.obs, explore=True) if self.rank == 0 else None
            t_act = time.perf_counter() - t0
            weights_K = self._broadcast_weights(weights_K)
            next_obs, reward, terminated, truncated, info = self.env.step(weights_K)
            sig = info["signals"]
            self.step = int(sig.step)
            self._prev_tokens = self.tokens_total
            self.tokens_total += sig.tokens
            agent_metrics: dict[str, float] = {}
            t1 = time.perf_counter()
            if self.rank == 0:
                self.mixer.observe(Transition.from_step(self.obs, weights_K, float(reward), next_obs, info))
                agent_metrics = dict(self.mixer.update() or {})
            t_agent = t_act + time.perf_counter() - t1
            self.obs = next_obs
            evaluated = self.step % cfg.eval.interval == 0 or self.step >= total
            eval_metrics = self.env.unwrapped.evaluate() if evaluated else {}
            if evaluated:
                last_eval = eval_metrics
            wall = time.perf_counter() - start
            if self.rank == 0:
                row = signals_row(
                    self.domain_names, info, step=self.step, tokens_total=self.tokens_total,
                    wall_time=wall, reward=float(reward),
                )
                row["time/agent_s"] = t_agent
                for key, value in agent_metrics.items():
                    row[key] = value
                row.update(eval_metrics)
                self.ledger.append(row)
                self._record(row, agent_metrics, bar, evaluated)
            checkpointing = is_checkpoint_step(cfg, self.step)
            path = self.checkpoint(wall) if checkpointing else None
            if path is not None and self.step == stable_checkpoint_step(cfg.optim, total):
                keep_stable_checkpoint(self.run_dir, path)
            if (evaluated or checkpointing) and self.hooks.on_report is not None:
                report = {k: float(v) for k, v in eval_metrics.items()}
                report.update(step=float(self.step), tokens=float(self.tokens_total))
                self.hooks.on_report(self.step, report, path)
            if terminated or truncated:
                break
        if bar is not None:
            bar.close()
        if self.rank == 0:
            self.ledger.flush()
        return {"run_dir": str(self.run_dir), "step": self.step, "eval": last_eval}

    def _evaluate_initial(self, start: float) -> dict[str, float]:
        """Evaluate the untrained model (step 0, every rank: evaluation is collective) so that curves start at
        the initial perplexity; rank 0 records it as the ledger's step-0 row and logs it. Only a fresh run
        gets here: a resumed run's ledger already holds this row, so it is never evaluated twice."""
        metrics = self.env.unwrapped.evaluate()
        if self.rank == 0:
            row: dict[str, Any] = {"step": 0, "tokens": 0, "wall_time": time.perf_counter() - start}
            row.update(metrics)
            self.ledger.append(row)
            if self.sink is not None:
                self.sink.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}, step=0)
            if "val/mean_ppl" in metrics:
                log.info("step 0/%d (untrained) val/mean_ppl %.3f", self.cfg.train.total_steps, metrics["val/mean_ppl"])
        return dict(metrics)

    def _record(self, row: dict[str, Any], agent_metrics: dict[str, float], bar: Any, evaluated: bool) -> None:
        """Progress line and batched metrics, rank 0 only."""
        interval = self.cfg.train.log_interval
        if bar is not None:
            weights = {name: row[f"weight/{name}"] for name in self.domain_names}
            top = max(weights, key=weights.__getitem__)
            postfix = (f"loss {row['loss']:.3f} | {si(self._tok_s(row))} tok/s | reward {row['reward']:+.3f} | "
                       f"top {top} {weights[top]:.2f}")
            if "val/mean_ppl" in row:
                postfix += f" | val/mean_ppl {row['val/mean_ppl']:.3f}"
            bar.update(self.step, postfix, force=evaluated)
        if self.sink is not None:
            self._accumulate(row, agent_metrics)
            if self.step % interval == 0 or evaluated or self.step >= self.cfg.train.total_steps:
                self.sink.log_metrics(self._window_metrics(row), step=self.step)

    def _tok_s(self, row: dict[str, Any]) -> float:
        step_s = row.get("time/step_s") or float("nan")
        return (row["tokens"] - self._prev_tokens) / step_s if step_s and step_s > 0 else float("nan")


# --------------------------------------------------------------------------------------------- builders
def build_env(cfg: ExperimentConfig) -> Any:
    """The LM-backed ``DataMixingEnv`` for this config (one process or one DDP rank)."""
    from envs.env import DataMixingEnv

    return DataMixingEnv(cfg, backend="lm")


def build_local_mixer(cfg: ExperimentConfig, env: Any, run_dir: Path | None = None) -> Any:
    """The configured mixer, in this process."""
    from agents import build_mixer

    return build_mixer(resolve_policy(cfg, run_dir), **mixer_kwargs(cfg, env))


def resolve_policy(cfg: ExperimentConfig, run_dir: Path | None) -> Any:
    """``cfg.agent`` with ``policy`` turned into a local file (MLflow artifact URIs are downloaded).

    ``agent.policy`` accepts a path or an MLflow artifact URI (``runs:/<run_id>/policy.pt``,
    ``mlflow-artifacts:/...``, ``models:/...``); agents only read local files.
    """
    policy = cfg.agent.policy
    if policy is None or Path(policy).exists() or ":/" not in policy:
        return cfg.agent
    import mlflow.artifacts

    from ray_jobs.tracking import resolve_tracking_uri

    dst = Path(run_dir or cfg.run_dir) / "downloaded_policy"
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=policy, dst_path=str(dst),
            tracking_uri=resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir),
        )
    except Exception as exc:  # mlflow raises several types for unknown runs and paths
        raise FileNotFoundError(f"agent.policy = {policy!r}: cannot download it from MLflow: {exc}") from None
    log.info("agent.policy %s downloaded to %s", policy, local)
    return cfg.agent.model_copy(update={"policy": local})


def warn_about_reward_coverage(cfg: ExperimentConfig) -> None:
    """The alignment reward needs >= 2 domains with a gradient each step; say so when it may not have them."""
    if cfg.agent.kind != "ac_odm" or cfg.agent.mode == "frozen":
        return
    if cfg.sampler.min_per_domain == 0:
        log.warning(
            "agent.kind=ac_odm with sampler.min_per_domain=0: steps whose micro-batches cover fewer than two "
            "domains give no alignment reward (the agent skips them), and a concentrated mixture can stop "
            "learning. The reference forces one micro-batch per domain: set sampler.min_per_domain: 1."
        )


def mixer_kwargs(cfg: ExperimentConfig, env: Any) -> dict[str, Any]:
    """Constructor arguments of a mixer for ``env`` (also used to build the agent Ray actor)."""
    backend = env.unwrapped.backend
    decisions = math.ceil(cfg.train.total_steps / cfg.env.steps_per_action)
    return {
        "observation_space": env.observation_space,
        "action_space": env.action_space,
        "seed": cfg.seed,
        "domain_names": list(cfg.data.domain_names),
        "natural_weights": np.asarray(backend.natural_weights_K, dtype=float),
        "total_steps": decisions,
        "floor": cfg.env.action_floor,
    }


def add_file_log(run_dir: Path) -> logging.Handler:
    """Mirror this process's INFO and higher records of acodm's packages to ``<run_dir>/run.log``."""
    handler = logging.FileHandler(Path(run_dir) / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    return handler


def remove_file_log(handler: logging.Handler) -> None:
    """Detach and close a handler from ``add_file_log``."""
    for name in PACKAGE_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


@owns_run_dir  # one driver per run directory; the corpus checked and recorded (ray_jobs/rundir.py)
def run_local(
    cfg: ExperimentConfig,
    resume: Path | None = None,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a whole experiment in this process, without Ray (the debugging path)."""
    run_dir, ckpt_path = prepare_run_dir(cfg, resume)
    done = finished_result(cfg, run_dir, ckpt_path)
    if done is not None:
        return done
    handler = add_file_log(run_dir)
    warn_about_reward_coverage(cfg)
    env = None
    sink = None
    status = "FAILED"
    try:
        env = build_env(cfg)
        mixer = build_local_mixer(cfg, env, run_dir)
        from ray_jobs.tracking import make_sink

        sink = make_sink(cfg, 0, run_dir=run_dir, parent_run_id=parent_run_id, tags=tags)
        loop = RunLoop(cfg, env, mixer, run_dir, sink=sink)
        if ckpt_path is not None:
            loop.restore(load_checkpoint(ckpt_path))
        result = loop.run()
        finish_run(cfg, run_dir, mixer, sink)
        status = "FINISHED"
        log.info("run finished: %s (ledger %s)", run_dir, run_dir / LEDGER_FILE)
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if sink is not None:
            sink.close(status)
        if env is not None:
            env.close()
        remove_file_log(handler)


def finished_result(cfg: ExperimentConfig, run_dir: Path, ckpt_path: Path | None) -> dict[str, Any] | None:
    """The result of a run that is already finished (its checkpoint is at ``train.total_steps``), else None.

    Running a finished run again (a second ``make demo``, the same ``acodm train``) must not train,
    start Ray or touch MLflow: the caller returns this result as it is, with the last evaluation read
    from the ledger, so the end-of-run summary is the same as the first time.
    """
    if ckpt_path is None:
        return None
    import json

    step = int(json.loads((Path(ckpt_path) / "loop.json").read_text())["step"])
    if step < cfg.train.total_steps:
        return None
    last_eval: dict[str, float] = {}
    ledger_path = Path(run_dir) / LEDGER_FILE
    if ledger_path.exists():
        rows = [r for r in Ledger.load(ledger_path).rows if _finite(r.get("val/mean_ppl"))]
        if rows:
            last_eval = {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and _finite(v)}
    log.info(
        "run %s is already finished (checkpoint at step %d, train.total_steps=%d): nothing to train, nothing "
        "logged to MLflow", run_dir, step, cfg.train.total_steps,
    )
    return {"run_dir": str(run_dir), "step": step, "eval": last_eval, "already_finished": True}


# Peak dense bf16 TFLOP/s of one GPU (vendors' data sheets, without sparsity), matched on the CUDA name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def known_peak_tflops() -> float | None:
    """The peak of this process's GPU from ``PEAK_TFLOPS`` (None on CPU or an unlisted GPU: set
    ``tracking.peak_tflops`` to get ``perf/mfu`` there). H100 PCIe's lower peak is not told apart."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def domain_train_tokens(prepared_dir: str | Path, names: list[str]) -> dict[str, int] | None:
    """Training tokens per domain from the prepared corpus's ``manifest.json`` (None if unreadable): the
    denominator of the passes (epochs) over each domain."""
    import json

    try:
        manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
        counts = {d["name"]: int(d["splits"]["train"]["num_tokens"]) for d in manifest["domains"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no per-domain token counts from %s/manifest.json (%s): no epochs metrics", prepared_dir, exc)
        return None
    return {n: counts[n] for n in names if n in counts}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def finish_run(cfg: ExperimentConfig, run_dir: Path, mixer: Any, sink: Any | None) -> None:
    """Save the policy (AC-ODM) and log the end-of-run artifacts."""
    policy = None
    if cfg.agent.kind == "ac_odm" and hasattr(mixer, "save_policy"):
        policy = run_dir / "policy.pt"
        mixer.save_policy(policy)
    if sink is None:
        return
    sink.log_artifact(run_dir / "config.yaml")
    sink.log_artifact(run_dir / LEDGER_FILE)
    if policy is not None and policy.exists():
        sink.log_artifact(policy)
    attach_report(run_dir, sink)


def attach_report(run_dir: Path, sink: Any) -> None:
    """Write the run's own report (``acodm report <run_dir>``, in a temporary directory, so the run directory
    is left to the user's own ``acodm report``) and attach it to its MLflow run under ``report/``, so the
    run page holds its curves. A report that fails is logged and skipped: the run itself has succeeded."""
    import tempfile

    from ray_jobs.tracking import MLflowSink

    if not isinstance(sink, MLflowSink):
        return
    try:
        from analysis.report import build_report

        with tempfile.TemporaryDirectory(prefix="acodm-report-") as tmp:
            html_path = build_report([run_dir], Path(tmp) / "report", title=f"acodm run {Path(run_dir).name}",
                                     announce=False)
            sink.log_artifact(html_path.parent, "report")
        log.info("report attached to MLflow run %s (artifacts report/)", sink.run_id)
    except Exception as exc:  # plotting or I/O; never fail a finished run over its report
        log.warning("could not attach the report of %s to MLflow run %s: %s", run_dir, sink.run_id, exc)
