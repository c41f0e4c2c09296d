"""Sample efficiency on the demo corpus: every mixing method, same token budget, several seeds.

Methods (``--methods`` picks a subset, always run in this order; the default is the main table):

* ``uniform``, ``natural`` (token shares): static baselines; uniform sets the target;
* ``odm``: ODM's smoothed-mean bandit (``smoothed_mean``); ``exp3``: EXP3;
* ``greedy``: the one-step greedy mixer (direction reward); ``mirror_descent``: mirror descent on the
  alignment scores;
* ``ac_odm``: AC-ODM online with the base config's defaults (the method under test of the goal check);
* ``ac_odm_reference``: AC-ODM as the paper describes it (``env.reward_mode: reference``, ODM as the
  warm-up teacher, no entropy term);
* ``best_static``: a small grid of fixed mixtures is run with the first seed, and the grid's best final
  ``val/mean_ppl`` is run with every seed. Choosing it with hindsight makes it an oracle no online method
  is given: it shows how much a fixed mixture can gain on this corpus;
* not in the default: ``ac_odm_proxy``: AC-ODM's policy trained online beside a smaller LM (``proxy.lm``
  of the base config), then frozen and steering the benchmark's LM (``ray_jobs.proxy.proxy_and_target``);
  with ``--ablation`` (or by name) the ablations of ``ac_odm``, each changing one setting back to the old
  default, and all four at once: ``abl_mixture_reward`` (``env.reward_mode: mixture``), ``abl_no_entropy``
  (``agent.entropy_coef: 0``), ``abl_odm_teacher`` (``agent.warmup_teacher: odm``), ``abl_sparse``
  (``sampler.min_per_domain: 0``), ``abl_raw_gram`` (``env.debias_gram: false``), ``abl_unsmoothed``
  (``env.reward_smoothing: 0``) and ``abl_old_default`` (the first four at once).

Scenarios (``--scenario``):

* ``all-targets`` (default): the base config's targets (every real domain; junk is not a target); the
  grid holds uniform and token shares over the targets, a code-heavy and a prose-heavy mixture;
* ``two-targets``: only ``code`` and ``doc_topics`` are targets; ``docstrings``, ``readmes``,
  ``licenses`` (helpers) and ``junk`` are trained on but not scored. ``val/mean_ppl``, and so uniform's
  best value that sets the steps-to-target target, is the mean over the two targets. The grid holds
  uniform and token shares over the two targets and ``targets+helpers-uniform`` (the five real domains
  alike), so the oracle can use the helpers.

Every run is in-process in a worker process (``ray.enabled: false``, no MLflow) with the base config
``configs/bench-demo.yaml``; ``--jobs N`` runs N at a time (``spawn`` workers, default 2). All runs that
depend on nothing are queued at once, seed by seed; the oracle's runs of the other seeds are queued once
the first seed's grid has finished, and a proxy method's target run once its proxy run has. A run whose
ledger is already complete is skipped and a run with a checkpoint resumes, so the benchmark can be
stopped and restarted. At the end it builds the report (``analysis.report``: comparison table with
arithmetic and geometric means over the target domains, steps-to-target against uniform's best with ratio
and noise flags, plots), prints the tables (with the mixtures over time, the largest weights and, when
ablations ran, the ablation table), and appends a section to ``benchmarks/RESULTS.md`` (not with
``--quick``, unless ``--results``).

Usage::

    .venv/bin/python benchmarks/sample_efficiency.py --quick --jobs 2       # smoke test, a few minutes
    nohup .venv/bin/python benchmarks/sample_efficiency.py --ablation > runs/bench/se.log 2>&1 &
    .venv/bin/python benchmarks/sample_efficiency.py --scenario two-targets
    .venv/bin/python benchmarks/sample_efficiency.py --methods uniform ac_odm --seeds 3 --steps 240
    .venv/bin/python benchmarks/sample_efficiency.py --methods uniform ac_odm --set optim.schedule=wsd \
        --out runs/bench/wsd
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    append_section,
    command_line,
    format_load,
    git_revision,
    machine_summary,
    markdown_table,
    utc_now,
)

from ray_jobs.config import ExperimentConfig, apply_overrides, load_yaml, set_dotted

log = logging.getLogger("sample_efficiency")

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench-demo.yaml"
ABLATION_METHODS = (
    "abl_mixture_reward",
    "abl_no_entropy",
    "abl_odm_teacher",
    "abl_sparse",
    "abl_raw_gram",
    "abl_unsmoothed",
    "abl_old_default",
)
METHOD_ORDER = (
    "uniform",
    "natural",
    "odm",
    "exp3",
    "greedy",
    "mirror_descent",
    "ac_odm",
    "ac_odm_reference",
    *ABLATION_METHODS,
    "ac_odm_proxy",
    "best_static",
)
# The main table (the default of --methods): no proxy method, no ablation.
MAIN_METHODS = tuple(m for m in METHOD_ORDER if m not in (*ABLATION_METHODS, "ac_odm_proxy"))
LABELS = {
    "uniform": "uniform",
    "natural": "natural",
    "odm": "ODM (smoothed mean)",
    "exp3": "EXP3",
    "greedy": "greedy (one-step, direction reward)",
    "mirror_descent": "mirror descent (alignment)",
    "ac_odm": "AC-ODM (default)",
    "ac_odm_reference": "AC-ODM (paper-faithful: reference reward, ODM teacher, no entropy)",
    "abl_mixture_reward": "ablation: mixture reward <w,s>",
    "abl_no_entropy": "ablation: no entropy term",
    "abl_odm_teacher": "ablation: ODM warm-up teacher",
    "abl_sparse": "ablation: domains may be absent (min_per_domain 0)",
    "abl_raw_gram": "ablation: raw Gram diagonal (self terms not debiased)",
    "abl_unsmoothed": "ablation: reward on the step's own Gram matrix (no smoothing)",
    "abl_old_default": "ablation: all four changes undone (the old default)",
    "ac_odm_proxy": "AC-ODM (proxy policy, frozen)",
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "uniform": {"agent.kind": "uniform"},
    "natural": {"agent.kind": "natural"},
    "odm": {"agent.kind": "smoothed_mean"},
    "exp3": {"agent.kind": "exp3"},
    "greedy": {"agent.kind": "greedy"},
    "mirror_descent": {"agent.kind": "mirror_descent"},
    "ac_odm": {"agent.kind": "ac_odm"},
    "ac_odm_reference": {
        "agent.kind": "ac_odm",
        "env.reward_mode": "reference",
        "agent.entropy_coef": 0.0,
        "agent.warmup_teacher": "odm",
    },
    "abl_mixture_reward": {"agent.kind": "ac_odm", "env.reward_mode": "mixture"},
    "abl_no_entropy": {"agent.kind": "ac_odm", "agent.entropy_coef": 0.0},
    "abl_odm_teacher": {"agent.kind": "ac_odm", "agent.warmup_teacher": "odm"},
    "abl_sparse": {"agent.kind": "ac_odm", "sampler.min_per_domain": 0},
    "abl_raw_gram": {"agent.kind": "ac_odm", "env.debias_gram": False},
    "abl_unsmoothed": {"agent.kind": "ac_odm", "env.reward_smoothing": 0.0},
    "abl_old_default": {
        "agent.kind": "ac_odm",
        "env.reward_mode": "mixture",
        "agent.entropy_coef": 0.0,
        "agent.warmup_teacher": "odm",
        "sampler.min_per_domain": 0,
    },
    "ac_odm_proxy": {"agent.kind": "ac_odm"},
}
# The goal check: the method under test and the rivals it must beat (uniform is the comparison's baseline).
UNDER_TEST = "ac_odm"
RIVALS = ("odm", "exp3", "greedy")
SCENARIOS = ("all-targets", "two-targets")
TWO_TARGETS = ("code", "doc_topics")
HELPERS = ("docstrings", "readmes", "licenses")  # trained on, not scored, in the two-targets scenario
# Static grid per scenario: relative weights over domain names (normalised over the named domains);
# domains a shape does not name get 0 (the env floor still applies).
GRID_SHAPES: dict[str, dict[str, dict[str, float]]] = {
    "all-targets": {
        "uniform-targets": {},  # filled with 1 per target domain
        "natural-targets": {},  # filled with the target domains' token counts
        "code-heavy": {"code": 4, "docstrings": 3, "doc_topics": 1, "readmes": 1, "licenses": 1},
        "prose-heavy": {"code": 1, "docstrings": 1, "doc_topics": 3, "readmes": 3, "licenses": 2},
    },
    "two-targets": {
        "uniform-targets": {},
        "natural-targets": {},
        "targets+helpers-uniform": {d: 1.0 for d in (*TWO_TARGETS, *HELPERS)},
    },
}
QUICK = {
    "train.total_steps": 6,
    "eval.interval": 3,
    "eval.max_batches": 1,
    "eval.batch_size": 4,
    "checkpoint.interval": 6,
}
WINDOWS = 4  # the mixture-over-time table splits each run into this many equal windows of steps


@dataclass
class RunRecord:
    """One finished (or skipped, or failed) run of the benchmark.

    ``order`` (seed position, method position, position within the method) sorts the records the same
    way whatever order the workers finished them in; ``fatal`` is a message that must stop the
    benchmark (the output directory holds runs of another configuration).
    """

    name: str
    method: str
    label: str
    seed: int
    run_dir: Path
    order: tuple[int, int, int] = (0, 0, 0)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    status: str = "pending"  # done | skipped (already complete) | failed
    error: str = ""
    fatal: str = ""


@dataclass(frozen=True)
class Job:
    """One run to hand to a worker: its config, method, label, sort key and whether it must leave a policy."""

    cfg: ExperimentConfig
    method: str
    label: str
    order: tuple[int, int, int]
    needs_policy: bool = False


@dataclass
class Plan:
    """What to run: the base config as a dict, the methods, seeds, scenario and output directory."""

    base: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    runs_dir: Path
    scenario: str = "all-targets"
    jobs: int = 2
    grid: dict[str, dict[str, float]] = field(default_factory=dict)
    records: list[RunRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- configs
def make_config(plan: Plan, name: str, seed: int, overrides: dict[str, Any]) -> ExperimentConfig:
    """The base config with a run name, seed, output directory and the method's overrides."""
    data = copy.deepcopy({**plan.base, "name": name, "seed": seed, "output_dir": str(plan.runs_dir)})
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return ExperimentConfig.from_dict(data, source=f"benchmark run {name}")


def apply_scenario(base: dict[str, Any], scenario: str) -> None:
    """Edit the base config's ``target`` flags for ``scenario`` in place (``all-targets`` keeps them).

    Raises:
        SystemExit: ``two-targets`` with a config that lacks one of its target or helper domains.
    """
    if scenario == "all-targets":
        return
    if scenario != "two-targets":
        raise SystemExit(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    domains = (base.get("data") or {}).get("domains") or []
    names = [d.get("name") for d in domains if isinstance(d, dict)]
    missing = [d for d in (*TWO_TARGETS, *HELPERS) if d not in names]
    if missing:
        raise SystemExit(
            f"--scenario two-targets needs the domains {list(TWO_TARGETS)} (targets) and {list(HELPERS)} "
            f"(helpers) in data.domains of the base config, but {missing} are missing (it has {names}); "
            "use the demo corpus's config (configs/bench-demo.yaml) or --scenario all-targets"
        )
    for d in domains:
        d["target"] = d["name"] in TWO_TARGETS


def static_grid(
    base: dict[str, Any], quick: bool, scenario: str = "all-targets"
) -> dict[str, dict[str, float]]:
    """The fixed mixtures of the scenario's grid as full weight dicts over the base config's domains."""
    from envs.data import PreparedCorpus

    cfg = ExperimentConfig.from_dict(base, source="base config")
    names = cfg.data.domain_names
    targets = [d.name for d in cfg.data.domains if d.target]
    corpus = PreparedCorpus.open(cfg.data.prepared_dir, expected_domains=names)
    grid: dict[str, dict[str, float]] = {}
    for key, shape in GRID_SHAPES[scenario].items():
        if key == "uniform-targets":
            shape = {d: 1.0 for d in targets}
        elif key == "natural-targets":
            shape = {d: float(corpus.num_tokens(names.index(d), "train")) for d in targets}
        if not set(shape) <= set(names):
            log.info("static grid: skipping %s (its domains %s are not all in %s)", key, sorted(shape), names)
            continue
        total = sum(shape.values())
        grid[key] = {d: round(shape.get(d, 0.0) / total, 4) for d in names}
    return dict(list(grid.items())[:2]) if quick else grid


# --------------------------------------------------------------------------------------------- running
def ledger_complete(run_dir: Path, total_steps: int) -> bool:
    """True when the run's ledger reaches ``total_steps``."""
    path = run_dir / "ledger.parquet"
    if not path.exists():
        return False
    import pyarrow.parquet as pq

    steps = pq.read_table(path, columns=["step"]).column("step").to_pylist()
    return bool(steps) and max(steps) >= total_steps


def init_worker(level: int) -> None:
    """Logging of a spawned worker process (it does not inherit the parent's configuration)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def run_one(job: Job) -> RunRecord:
    """Run ``job.cfg`` in this (worker) process unless its ledger is already complete; never raises.

    Returns:
        The run's record: status, error, and the wall and CPU seconds (``time.process_time`` of this
        process, so of this run alone) it took.
    """
    from ray_jobs.driver import run_local

    cfg = job.cfg
    record = RunRecord(cfg.name, job.method, job.label, cfg.seed, cfg.run_dir, order=job.order)
    done = ledger_complete(cfg.run_dir, cfg.train.total_steps)
    if done and (not job.needs_policy or (cfg.run_dir / "policy.pt").exists()):
        record.status = "skipped"
        log.info("%-34s already complete, skipped", cfg.name)
        return record
    log.info("%-34s starting (%s, seed %d, %s)", cfg.name, job.label, cfg.seed, format_load())
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        run_local(cfg)
        record.status = "done"
    except ValueError as exc:
        if "different config" in str(exc):
            record.fatal = (
                f"{exc}\nThe output directory holds runs of another configuration; pass another "
                "--out or the same --steps/--config/--scenario as before."
            )
        record.status, record.error = "failed", repr(exc)
    except Exception as exc:  # keep going: one broken run must not cost the hour of the others
        record.status, record.error = "failed", repr(exc)
    record.wall_s, record.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    if record.status == "failed":
        log.error("%s failed after %.0f s: %s", cfg.name, record.wall_s, record.error)
    else:
        log.info("%-34s done in %.0f s wall, %.0f s CPU", cfg.name, record.wall_s, record.cpu_s)
    return record


def pick_best_static(plan: Plan, seed: int) -> str | None:
    """The grid key with the lowest final ``val/mean_ppl`` among the complete grid runs of ``seed``."""
    from analysis.metrics import final_value
    from analysis.runs import load_run

    total = plan.base["train"]["total_steps"]
    finals = {}
    for key in plan.grid:
        run_dir = plan.runs_dir / f"static-{key}-s{seed}"
        if ledger_complete(run_dir, total):
            finals[key] = final_value(load_run(run_dir))
    return min(finals, key=finals.__getitem__) if finals else None


def static_job(plan: Plan, key: str, seed: int, order: tuple[int, int, int]) -> Job:
    """The run of grid mixture ``key`` with ``seed``."""
    cfg = make_config(
        plan, f"static-{key}-s{seed}", seed, {"agent.kind": "fixed", "agent.weights": plan.grid[key]}
    )
    return Job(cfg, f"static:{key}", f"static {key}", order)


class Scheduler:
    """Hands the plan's runs to a pool of spawned workers, queueing dependent runs when they may start.

    Independent runs are queued at once, seed by seed in method order (the pool starts them in that
    order); the oracle's runs of the other seeds wait for the first seed's whole grid (``pick_best_static``
    chooses among them), and a proxy method's target run waits for its proxy run. ``plan.records`` ends
    sorted by (seed, method, position), whatever order the runs finished in.
    """

    def __init__(self, plan: Plan, pool: ProcessPoolExecutor) -> None:
        self.plan = plan
        self.pool = pool
        self.pending: dict[Future[RunRecord], Job] = {}
        self.after: dict[str, Job] = {}  # run name -> the job that may start once that run succeeded
        self.grid_left: set[str] = set()  # the first seed's grid runs that have not finished
        self.best: str | None = None
        self.finished = 0

    def submit(self, job: Job) -> None:
        """Queue ``job``; a pool that cannot take it any more records it as failed."""
        try:
            self.pending[self.pool.submit(run_one, job)] = job
        except Exception as exc:  # BrokenProcessPool: a worker died; the other runs cannot start either
            self.finish(self._failed(job, exc))

    def start(self) -> None:
        """Queue every run that depends on nothing."""
        from ray_jobs.proxy import proxy_and_target

        plan, first = self.plan, self.plan.seeds[0]
        for si, seed in enumerate(plan.seeds):
            for mi, method in enumerate(plan.methods):
                if method == "ac_odm_proxy":
                    cfg = make_config(plan, f"ac_odm_proxy-s{seed}", seed, OVERRIDES["ac_odm_proxy"])
                    proxy_cfg, target_cfg = proxy_and_target(cfg)
                    self.after[proxy_cfg.name] = Job(target_cfg, method, LABELS[method], (si, mi, 1))
                    label = "AC-ODM proxy run (small LM)"
                    self.submit(Job(proxy_cfg, f"{method}:proxy", label, (si, mi, 0), needs_policy=True))
                elif method == "best_static":
                    if seed != first:
                        continue  # queued once the first seed's grid has finished
                    self.grid_left = {f"static-{key}-s{seed}" for key in plan.grid}
                    for gi, key in enumerate(plan.grid):
                        self.submit(static_job(plan, key, seed, (si, mi, gi)))
                    if not plan.grid:
                        self.grid_done()
                else:
                    cfg = make_config(plan, f"{method}-s{seed}", seed, OVERRIDES[method])
                    self.submit(Job(cfg, method, LABELS[method], (si, mi, 0)))

    def grid_done(self) -> None:
        """The first seed's grid has finished: pick the best mixture and queue it for the other seeds."""
        plan = self.plan
        self.best = pick_best_static(plan, plan.seeds[0])
        log.info("best static mixture of the grid (seed %d): %s", plan.seeds[0], self.best)
        if self.best is None:
            return
        mi = plan.methods.index("best_static")
        for si, seed in enumerate(plan.seeds[1:], start=1):
            self.submit(static_job(plan, self.best, seed, (si, mi, 0)))

    def finish(self, record: RunRecord) -> None:
        """Record a finished run and queue what waited for it."""
        self.plan.records.append(record)
        self.finished += 1
        log.info(
            "%d runs finished (%s: %s), %d queued or running",
            self.finished,
            record.name,
            record.status,
            len(self.pending),
        )
        if record.fatal:
            raise SystemExit(record.fatal)
        follow = self.after.pop(record.name, None)
        if follow is not None:
            if record.status == "failed":
                log.error("%s is not run: its proxy run %s failed", follow.cfg.name, record.name)
            else:
                self.submit(follow)
        if record.name in self.grid_left:
            self.grid_left.discard(record.name)
            if not self.grid_left:
                self.grid_done()

    def run(self) -> str | None:
        """Run everything; returns the best static key (None without the oracle or without a grid run)."""
        self.start()
        while self.pending:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for future in done:
                job = self.pending.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # the worker died (killed, out of memory) or the job did not pickle
                    record = self._failed(job, exc)
                self.finish(record)
        self.plan.records.sort(key=lambda r: r.order)
        return self.best

    @staticmethod
    def _failed(job: Job, exc: BaseException) -> RunRecord:
        log.error("%s failed in the pool: %r", job.cfg.name, exc)
        return RunRecord(
            job.cfg.name,
            job.method,
            job.label,
            job.cfg.seed,
            job.cfg.run_dir,
            order=job.order,
            status="failed",
            error=repr(exc),
        )


def run_plan(plan: Plan) -> str | None:
    """Every run, ``plan.jobs`` at a time in spawned workers; returns the best static key."""
    pool = ProcessPoolExecutor(
        max_workers=plan.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(logging.getLogger().level,),
    )
    try:
        best = Scheduler(plan, pool).run()
    except BaseException:  # SystemExit, KeyboardInterrupt: drop the queue, let the running runs end
        log.error("stopping: the queued runs are dropped; waiting for the running ones to end")
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return best


# --------------------------------------------------------------------------------------------- summary
def report_runs(plan: Plan, best: str | None) -> tuple[list[Any], Any]:
    """The runs that enter the comparison (complete ones, labelled) and the comparison itself."""
    from analysis.metrics import compare
    from analysis.runs import load_run

    runs = []
    for r in plan.records:
        if r.status == "failed" or ":" in r.method:  # proxy-side runs and grid members are not methods
            if r.method == f"static:{best}" and r.status != "failed":
                runs.append(load_run(r.run_dir, method=f"best static, oracle ({best})"))
            continue
        runs.append(load_run(r.run_dir, method=r.label))
    return runs, compare(runs)


def grid_table(plan: Plan, best: str | None, target: float) -> tuple[list[str], list[list[str]]]:
    """The static grid's runs of the first seed: mixture, final ppl, steps-to-target."""
    from analysis.metrics import final_geo_ppl, final_value, run_steps_to_target
    from analysis.runs import load_run

    rows = []
    for key, weights in plan.grid.items():
        run_dir = plan.runs_dir / f"static-{key}-s{plan.seeds[0]}"
        if not (run_dir / "ledger.parquet").exists():
            continue
        run = load_run(run_dir)
        mix = ", ".join(f"{d} {w:.2f}" for d, w in weights.items() if w > 0)
        steps = run_steps_to_target(run, target)
        rows.append(
            [
                key + (" (best)" if key == best else ""),
                mix,
                f"{final_value(run):.4g}",
                f"{final_geo_ppl(run):.4g}",
                f"{steps:.0f}" if math.isfinite(steps) else "not reached",
            ]
        )
    return [
        f"grid mixture (seed {plan.seeds[0]})",
        "weights (others at the floor)",
        "final val/mean_ppl",
        "final geo-mean ppl",
        "steps to target",
    ], rows


def data_table(comparison: Any) -> tuple[list[str], list[list[str]]]:
    """Per method: the share of training tokens per domain and the mean alignment score when present."""
    import numpy as np

    groups = comparison.groups
    names = next(iter(groups.values()))[0].domain_names
    header = ["method", *[f"{d} tokens / score" for d in names]]
    rows = []
    for method, runs in groups.items():
        cells = []
        for d in names:
            share = np.mean([r.ledger[f"tokens/{d}"].sum() / r.ledger["tokens"].iloc[-1] for r in runs])
            present = [
                r.ledger.loc[r.ledger[f"microbatches/{d}"] > 0, f"score/{d}"].to_numpy(float)
                for r in runs
                if f"score/{d}" in r.ledger.columns
            ]
            scores = np.concatenate(present) if present else np.array([])
            cells.append(f"{share:.1%} / " + (f"{scores.mean():+.2f}" if scores.size else "n/a"))
        rows.append([method, *cells])
    return header, rows


def is_adaptive(runs: list[Any]) -> bool:
    """True for a method whose mixture moves (not uniform, natural or a fixed mixture)."""
    return runs[0].kind not in ("uniform", "natural", "fixed")


def weights_of(run: Any) -> tuple[Any, Any]:
    """The run's training steps and its mixture weights per step and domain (``weight/<domain>`` columns);
    the step-0 row (the untrained model's evaluation, no mixture yet) is left out."""
    led = run.ledger
    led = led[led["step"] > 0]
    return led["step"].to_numpy(int), led[[f"weight/{d}" for d in run.domain_names]].to_numpy(float)


def largest_weights(comparison: Any) -> dict[str, tuple[float, float]]:
    """Per method, means over seeds of: the largest weight of any domain at any step; the largest of the
    domains' mean weights over the last quarter of the run."""
    import numpy as np

    out = {}
    for method, runs in comparison.groups.items():
        peak, late = [], []
        for r in runs:
            w_TK = weights_of(r)[1]
            peak.append(w_TK.max())
            late.append(w_TK[-max(1, len(w_TK) // 4) :].mean(axis=0).max())
        out[method] = (float(np.mean(peak)), float(np.mean(late)))
    return out


def windows(total_steps: int, n: int = WINDOWS) -> list[tuple[int, int]]:
    """``n`` equal windows of steps ``1..total_steps`` as (first, last) steps: 1-60, 61-120, ... for 240."""
    edges = [round(total_steps * i / n) for i in range(n + 1)]
    return [(lo + 1, hi) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]


def mixture_over_time(
    comparison: Any, total_steps: int
) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """Per adaptive method, a table: mean weight per domain (over steps of a window, then over seeds)."""
    import numpy as np

    tables = []
    for method, runs in comparison.groups.items():
        if not is_adaptive(runs):
            continue
        names = runs[0].domain_names
        header = ["steps", *names, "largest (max over steps, mean over seeds)"]
        rows = []
        for lo, hi in windows(total_steps):
            means, peaks = [], []
            for r in runs:
                steps_T, w_TK = weights_of(r)
                inside = (steps_T >= lo) & (steps_T <= hi)
                if inside.any():
                    means.append(w_TK[inside].mean(axis=0))
                    peaks.append(w_TK[inside].max())
            if not means:
                continue
            mean_K = np.mean(means, axis=0)
            rows.append([f"{lo}-{hi}", *[f"{w:.2f}" for w in mean_K], f"{np.mean(peaks):.2f}"])
        tables.append((method, (header, rows)))
    return tables


def with_largest_weights(
    table: tuple[list[str], list[list[str]]], comparison: Any
) -> tuple[list[str], list[list[str]]]:
    """``table`` (first column: method) with the largest-weight columns appended."""
    largest = largest_weights(comparison)
    header, rows = table
    header = [
        *header,
        "largest weight (max over steps, mean over seeds)",
        "largest weight in last quarter (largest domain mean, mean over seeds)",
    ]
    out = []
    for row in rows:
        peak, late = largest.get(row[0], (math.nan, math.nan))
        out.append([*row, f"{peak:.2f}", f"{late:.2f}"])
    return header, out


def _pm(mean: float, half: float) -> str:
    """``mean ± half`` (just the mean when the half-width is unknown)."""
    if not math.isfinite(mean):
        return str(mean)
    return f"{mean:.4g} \u00b1 {half:.2g}" if math.isfinite(half) else f"{mean:.4g}"


def changes(plan: Plan, method: str) -> str:
    """What an ablation changes from the default AC-ODM: ``key: default -> value`` per setting."""
    from analysis.runs import get_dotted

    default = make_config(plan, "defaults", plan.seeds[0], OVERRIDES["ac_odm"]).to_dict()
    parts = []
    for key, value in OVERRIDES[method].items():
        if key == "agent.kind":
            continue
        was = get_dotted(default, key)
        parts.append(
            f"{key}: {was} \u2192 {value}" if was != value else f"{key}: {value} (already the default)"
        )
    return "; ".join(parts) or "nothing (the default)"


def ablation_table(plan: Plan, comparison: Any) -> tuple[list[str], list[list[str]]]:
    """The default AC-ODM and each ablation that ran: the change, final ppl, step ratio, late concentration."""
    t = comparison.table.set_index("method")
    largest = largest_weights(comparison)
    rows = []
    for method in (UNDER_TEST, *ABLATION_METHODS):
        label = LABELS[method]
        if label not in t.index:
            continue
        row = t.loc[label]
        r = row["step_ratio"]
        if math.isfinite(r):
            ratio = f"{r:.3g}\u00d7" + (" (within uniform's seed noise)" if row["ratio_noise"] else "")
        else:
            ratio = f"not reached ({row['reached']}/{row['seeds']} seeds reached)"
        rows.append(
            [
                label,
                "nothing (the default)" if method == UNDER_TEST else changes(plan, method),
                _pm(row["final_ppl"], row["final_ppl_ci"]),
                ratio,
                f"{largest[label][1]:.2f}",
            ]
        )
    header = [
        "method",
        "what changed",
        f"final {comparison.metric} (mean \u00b1 95% CI)",
        "steps-to-target ratio to uniform",
        "largest weight in last quarter",
    ]
    return header, rows


def concentration_table(comparison: Any) -> tuple[list[str], list[list[str]]]:
    """Per run of an adaptive method: where its mixture went, and how much reward signal was left there.

    The first step any weight exceeded 0.5; the last quarter's dominant domain and its mean weight;
    over the second half of training, the share of steps whose micro-batches covered at most two
    domains (two present domains give identical off-diagonal Gram row sums, hence all-zero alignment
    scores; one gives no reward at all) and the share of steps with no alignment signal (every
    ``|score| < 1e-6``); the transitions the agent dropped as invalid.
    """
    import numpy as np

    header = [
        "method",
        "seed",
        "first step with a weight > 0.5",
        "dominant domain (last quarter)",
        "its weight",
        "steps with <= 2 domains (2nd half)",
        "steps without alignment signal (2nd half)",
        "transitions dropped",
    ]
    rows = []
    for method, runs in comparison.groups.items():
        if not is_adaptive(runs):
            continue
        for r in runs:
            led, names = r.ledger[r.ledger["step"] > 0], r.domain_names  # training steps only
            steps_T, weights_TK = weights_of(r)
            late_K = weights_TK[-max(1, len(led) // 4) :].mean(axis=0)
            over_T = weights_TK.max(axis=1) > 0.5
            first = str(int(steps_T[int(over_T.argmax())])) if over_T.any() else "never"
            half = led.iloc[len(led) // 2 :]
            present_T = (half[[f"microbatches/{d}" for d in names]] > 0).sum(axis=1)
            scores = [f"score/{d}" for d in names if f"score/{d}" in half]
            silent = (half[scores].abs().max(axis=1) < 1e-6).mean() if scores else math.nan
            dropped = (
                led["agent/skipped_transitions"].max() if "agent/skipped_transitions" in led else math.nan
            )
            rows.append(
                [
                    method,
                    str(r.seed),
                    first,
                    names[int(late_K.argmax())],
                    f"{late_K.max():.2f}",
                    f"{(present_T <= 2).mean():.0%}",
                    f"{silent:.0%}",
                    "\u2014" if not np.isfinite(dropped) else f"{dropped:.0f}",
                ]
            )
    return header, rows


def reading(c: Any) -> list[str]:
    """Facts read off the comparison: each method against uniform (noise flagged), the AC-ODM goal check.

    The goal check takes ``AC-ODM (default)`` as the method under test: its step ratio must be <= 0.5
    and ahead of uniform (ratio 1), ODM, EXP3, greedy and the best static mixture by more than uniform's
    ratio spread. The other AC-ODM rows are checked against the same rivals.
    """
    t = c.table.set_index("method")
    base = c.baseline
    spread = c.uniform_ratio_sd if math.isfinite(c.uniform_ratio_sd) else 0.0
    lines = [f"Target: {c.target_rule}."]
    for method, row in t.sort_values("step_ratio").iterrows():
        if method == base:
            continue
        r = row["step_ratio"]
        if math.isfinite(r):
            what = f"reaches it in {r:.2f}x uniform's steps" + (
                " (within uniform's seed noise)" if row["ratio_noise"] else ""
            )
        else:
            what = f"does not reach it in every seed ({row['reached']}/{row['seeds']} seeds do)"
        noise = " (within noise)" if row["ppl_noise"] else ""
        lines.append(
            f"{method} {what}; final val/mean_ppl {row['final_ppl']:.4g}{noise} vs uniform's "
            f"{t.loc[base, 'final_ppl']:.4g}."
        )
    rivals = [
        m for m in t.index if m == base or m in {LABELS[k] for k in RIVALS} or m.startswith("best static")
    ]
    under_test = LABELS[UNDER_TEST]
    checked = [under_test] if under_test in t.index else []
    checked += [m for m in t.index if m.startswith("AC-ODM") and m != under_test]
    for m in checked:
        r = t.loc[m, "step_ratio"]
        ahead = [o for o in rivals if r < t.loc[o, "step_ratio"] - spread]
        met = r <= 0.5 and len(ahead) == len(rivals)
        role = "method under test" if m == under_test else "other AC-ODM variant"
        lines.append(
            f"Goal check ({role}), {m}: ratio {r:.2f} (goal: <= 0.5 and ahead of "
            f"{', '.join(rivals) or 'no rival'} by more than uniform's ratio spread {spread:.3f}): "
            f"{'met' if met else 'not met'}; ahead of: {', '.join(ahead) or 'none'}."
        )
    return lines


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def scenario_text(plan: Plan, comparison: Any) -> str:
    """One line: which domains are targets (scored) and which are only trained on, and the target rule."""
    first = next(iter(comparison.groups.values()))[0]
    others = [d for d in first.domain_names if d not in first.target_domains]
    return (
        f"Scenario {plan.scenario}: targets {', '.join(first.target_domains)}; not targets (trained on, not "
        f"scored) {', '.join(others) or 'none'}. val/mean_ppl is the mean perplexity over the targets only, "
        "and the steps-to-target target is uniform's best val/mean_ppl (the largest of the uniform seeds' "
        "best values, analysis.metrics.default_target), so it is the target domains' mean here too."
    )


def summarize(plan: Plan, best: str | None, header: dict[str, Any]) -> str:
    """The RESULTS.md section: provenance, the comparison, per-domain finals, grid, data, mixtures, reading."""
    from analysis.report import comparison_table, domain_table, write_report

    runs, comparison = report_runs(plan, best)
    title = f"Sample efficiency on the demo corpus, scenario {plan.scenario}"
    report = write_report(runs, plan.runs_dir.parent / "report", title=title)
    counts = {s: sum(r.status == s for r in plan.records) for s in ("done", "skipped", "failed")}
    ran = [r for r in plan.records if r.status == "done"]
    cpu = sum(r.cpu_s for r in ran)
    steps = plan.base["train"]["total_steps"]
    parts = [
        f"## {title}{' (--quick smoke run)' if header['quick'] else ''}",
        f"- Command: `{header['command']}` (base config `{_shown(header['config'])}`, {steps} steps per run, "
        f"seeds {plan.seeds}, {plan.jobs} runs at a time)",
        f"- Started {header['started']}; wall time {header['wall_s'] / 60:.1f} min for {counts['done']} runs "
        f"({counts['skipped']} complete runs reused, {counts['failed']} failed); CPU time of the runs "
        f"{cpu / 60:.1f} min (1 torch thread per run: about {plan.jobs} x the wall time on {plan.jobs} idle "
        "cores)",
        f"- Machine: {header['machine']}; revision {header['revision']}",
        f"- Load average at start: {header['load_start']}; at end: {header['load_end']}",
        f"- {scenario_text(plan, comparison)}",
        f"- Report with plots: `{_shown(report)}`",
        "",
        markdown_table(*with_largest_weights(comparison_table(comparison), comparison)),
        "",
        *[f"- {n}" for n in comparison.notes],
        "- Largest weight: per run, the largest weight any domain got at any step, and the largest of the "
        "domains' mean weights over the last quarter of the run; both averaged over seeds.",
        "",
        "Final validation perplexity per domain:",
        "",
        markdown_table(*domain_table(comparison)),
        "",
    ]
    if any(LABELS[m] in comparison.groups for m in ABLATION_METHODS):
        parts += [
            "Ablations of AC-ODM (default), one setting changed back to the old default at a time, then all:",
            "",
            markdown_table(*ablation_table(plan, comparison)),
            "",
        ]
    if plan.grid:
        parts += [
            "Static grid (the oracle's candidates, first seed):",
            "",
            markdown_table(*grid_table(plan, best, comparison.target)),
            "",
        ]
    parts += [
        "Training data actually used (share of tokens per domain, mean over seeds) and the mean alignment "
        "score of the domain on the steps it was present (z-scored over present domains; > 0 = its "
        "gradient agrees with the others'):",
        "",
        markdown_table(*data_table(comparison)),
        "",
    ]
    for method, table in mixture_over_time(comparison, steps):
        parts += [
            f"Mixture over time, {method} (mean weight per domain over the window's steps, mean over seeds):",
            "",
            markdown_table(*table),
            "",
        ]
    parts += [
        "Where the adaptive methods' mixtures went, per run:",
        "",
        markdown_table(*concentration_table(comparison)),
        "",
        "Reading (computed):",
        "",
        *[f"- {line}" for line in reading(comparison)],
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted field of the base config for every run, as `acodm train --set` "
        "(e.g. --set optim.schedule=wsd; repeatable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory: runs/ and report/ (default runs/bench/sample_efficiency[_two_targets][_quick])",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="all-targets",
        help="all-targets: the config's targets; two-targets: only code and doc_topics are targets "
        "(default %(default)s)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per method (default 3; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default: the config's)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_ORDER,
        default=list(MAIN_METHODS),
        help="methods to run (uniform is needed for the target; default the main table: %(default)s)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help=f"also run the ablations of ac_odm: {', '.join(ABLATION_METHODS)}",
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, one process each (default %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the config's)")
    p.add_argument("--quick", action="store_true", help="tiny smoke version: 6 steps, 2 grid mixtures")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="append a section to this file (default benchmarks/RESULTS.md; none with --quick)",
    )
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def build_plan(args: argparse.Namespace) -> Plan:
    """The base config (scenario, --quick/--steps/--threads applied), methods, seeds and directories."""
    base = apply_overrides(load_yaml(args.config), args.set)
    apply_scenario(base, args.scenario)
    edits: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        edits["train.total_steps"] = args.steps
    if args.threads is not None:
        edits["lm.num_threads"] = args.threads
        edits["proxy.lm.num_threads"] = args.threads
    for key, value in edits.items():
        set_dotted(base, key, value)
    name = "sample_efficiency" + ("_two_targets" if args.scenario == "two-targets" else "")
    out = args.out or REPO_ROOT / "runs" / "bench" / (name + ("_quick" if args.quick else ""))
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    chosen = set(args.methods) | (set(ABLATION_METHODS) if args.ablation else set())
    methods = [m for m in METHOD_ORDER if m in chosen]
    if "uniform" not in methods:
        raise SystemExit(
            "--methods must include uniform: its best val/mean_ppl is the steps-to-target target"
        )
    ExperimentConfig.from_dict(base, source=str(args.config))  # fail now, not after an hour
    plan = Plan(
        base=base,
        methods=methods,
        seeds=seeds,
        runs_dir=Path(out) / "runs",
        scenario=args.scenario,
        jobs=args.jobs,
    )
    for method in methods:  # every method's config must load too (a setting the config does not know yet)
        if method != "best_static":
            make_config(plan, f"{method}-check", seeds[0], OVERRIDES[method])
    plan.grid = static_grid(base, args.quick, args.scenario) if "best_static" in methods else {}
    return plan


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, build the report, print the tables and append the RESULTS.md section."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = parse_args(argv)
    plan = build_plan(args)
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    start_load, started, start_s = format_load(), utc_now(), time.perf_counter()
    log.info(
        "sample-efficiency benchmark (%s): methods %s, seeds %s, %d steps, %d runs at a time, runs in %s; %s",
        plan.scenario,
        plan.methods,
        plan.seeds,
        plan.base["train"]["total_steps"],
        plan.jobs,
        plan.runs_dir,
        start_load,
    )
    best = run_plan(plan)
    text = summarize(
        plan,
        best,
        header={
            "command": command_line(),
            "config": args.config.resolve(),
            "machine": machine_summary(),
            "revision": git_revision(),
            "started": started,
            "load_start": start_load,
            "load_end": format_load(),
            "wall_s": time.perf_counter() - start_s,
            "quick": args.quick,
        },
    )
    print(text)
    results = args.results or (
        None if args.quick or args.no_results else REPO_ROOT / "benchmarks" / "RESULTS.md"
    )
    if results is not None and not args.no_results:
        log.info("appended the section to %s", append_section(text, results))
    failed = [r.name for r in plan.records if r.status == "failed"]
    if failed:
        log.error("%d runs failed: %s (see their run.log)", len(failed), failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
