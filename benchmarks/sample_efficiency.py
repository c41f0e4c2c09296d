"""Sample efficiency on the demo corpus: every mixing method, same token budget, several seeds.

Methods (``--methods`` picks a subset, in this order):

* ``uniform``, ``natural`` (token shares): static baselines; uniform sets the target;
* ``odm``: ODM's smoothed-mean bandit (``smoothed_mean``); ``exp3``: EXP3;
* ``ac_odm``: AC-ODM online with the default ``mixture`` reward; ``ac_odm_reference``: with the
  reference's per-domain reward (``env.reward_mode: reference``);
* ``ac_odm_proxy``: AC-ODM's policy trained online beside a smaller LM (``proxy.lm`` of the base config),
  then frozen and steering the benchmark's LM (``ray_jobs.proxy.proxy_and_target``);
* ``best_static``: a small grid of fixed mixtures (no non-target domain; uniform, token shares, code-
  heavy, prose-heavy) is run with the first seed, and the grid's best final ``val/mean_ppl`` is run with
  every seed. Choosing it with hindsight makes it an oracle no online method is given: it shows how much
  a fixed mixture can gain on this corpus.

Every run is in-process (``ray.enabled: false``, no MLflow) with the base config
``configs/bench-demo.yaml``, run one after the other; a run whose ledger is already complete is skipped
and a run with a checkpoint resumes, so the benchmark can be stopped and restarted. At the end it
builds the report (``analysis.report``: comparison table with arithmetic and geometric means over the
target domains, steps-to-target against uniform's best with ratio and noise flags, plots), prints the
tables, and appends a section to ``benchmarks/RESULTS.md`` (not with ``--quick``, unless ``--results``).

Usage::

    .venv/bin/python benchmarks/sample_efficiency.py --quick              # smoke test, a few minutes
    nohup .venv/bin/python benchmarks/sample_efficiency.py > runs/bench/se.log 2>&1 &
    .venv/bin/python benchmarks/sample_efficiency.py --methods uniform ac_odm --seeds 3 --steps 240
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
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

from ray_jobs.config import ExperimentConfig, load_yaml, set_dotted

log = logging.getLogger("sample_efficiency")

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench-demo.yaml"
METHOD_ORDER = (
    "uniform",
    "natural",
    "odm",
    "exp3",
    "ac_odm",
    "ac_odm_reference",
    "ac_odm_proxy",
    "best_static",
)
LABELS = {
    "uniform": "uniform",
    "natural": "natural",
    "odm": "ODM (smoothed mean)",
    "exp3": "EXP3",
    "ac_odm": "AC-ODM (online)",
    "ac_odm_reference": "AC-ODM (online, reference reward)",
    "ac_odm_proxy": "AC-ODM (proxy policy, frozen)",
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "uniform": {"agent.kind": "uniform"},
    "natural": {"agent.kind": "natural"},
    "odm": {"agent.kind": "smoothed_mean"},
    "exp3": {"agent.kind": "exp3"},
    "ac_odm": {"agent.kind": "ac_odm"},
    "ac_odm_reference": {"agent.kind": "ac_odm", "env.reward_mode": "reference"},
    "ac_odm_proxy": {"agent.kind": "ac_odm"},
}
# Static grid: relative weights over domain names; non-target domains get 0 (the env floor still applies).
GRID_SHAPES: dict[str, dict[str, float]] = {
    "uniform-targets": {},  # filled with 1 per target domain
    "natural-targets": {},  # filled with the target domains' token counts
    "code-heavy": {"code": 4, "docstrings": 3, "doc_topics": 1, "readmes": 1, "licenses": 1},
    "prose-heavy": {"code": 1, "docstrings": 1, "doc_topics": 3, "readmes": 3, "licenses": 2},
}
QUICK = {
    "train.total_steps": 6,
    "eval.interval": 3,
    "eval.max_batches": 1,
    "eval.batch_size": 4,
    "checkpoint.interval": 6,
}


@dataclass
class RunRecord:
    """One finished (or skipped, or failed) run of the benchmark."""

    name: str
    method: str
    label: str
    seed: int
    run_dir: Path
    wall_s: float = 0.0
    cpu_s: float = 0.0
    status: str = "pending"  # done | skipped (already complete) | failed
    error: str = ""


@dataclass
class Plan:
    """What to run: the base config as a dict, the methods, seeds and output directory."""

    base: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    runs_dir: Path
    grid: dict[str, dict[str, float]] = field(default_factory=dict)
    records: list[RunRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- configs
def make_config(plan: Plan, name: str, seed: int, overrides: dict[str, Any]) -> ExperimentConfig:
    """The base config with a run name, seed, output directory and the method's overrides."""
    data = copy.deepcopy({**plan.base, "name": name, "seed": seed, "output_dir": str(plan.runs_dir)})
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return ExperimentConfig.from_dict(data, source=f"benchmark run {name}")


def static_grid(base: dict[str, Any], quick: bool) -> dict[str, dict[str, float]]:
    """The fixed mixtures of the grid as full weight dicts over the base config's domains."""
    from envs.data import PreparedCorpus

    cfg = ExperimentConfig.from_dict(base, source="base config")
    names = cfg.data.domain_names
    targets = [d.name for d in cfg.data.domains if d.target]
    corpus = PreparedCorpus.open(cfg.data.prepared_dir, expected_domains=names)
    grid: dict[str, dict[str, float]] = {}
    for key, shape in GRID_SHAPES.items():
        if key == "uniform-targets":
            shape = {d: 1.0 for d in targets}
        elif key == "natural-targets":
            shape = {d: float(corpus.num_tokens(names.index(d), "train")) for d in targets}
        if not set(shape) <= set(names):
            log.info("static grid: skipping %s (its domains %s are not all in %s)", key, sorted(shape), names)
            continue
        total = sum(shape.get(d, 0.0) for d in targets)
        grid[key] = {d: (round(shape.get(d, 0.0) / total, 4) if d in targets else 0.0) for d in names}
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


def run_one(
    plan: Plan, cfg: ExperimentConfig, method: str, label: str, *, needs_policy: bool = False
) -> RunRecord:
    """Run ``cfg`` in-process unless its ledger is already complete; never raises for a failed run."""
    from ray_jobs.driver import run_local

    record = RunRecord(cfg.name, method, label, cfg.seed, cfg.run_dir)
    plan.records.append(record)
    done = ledger_complete(cfg.run_dir, cfg.train.total_steps)
    if done and (not needs_policy or (cfg.run_dir / "policy.pt").exists()):
        record.status = "skipped"
        log.info("%-34s already complete, skipped", cfg.name)
        return record
    log.info("%-34s starting (%s, seed %d, %s)", cfg.name, label, cfg.seed, format_load())
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        run_local(cfg)
        record.status = "done"
    except ValueError as exc:
        if "different config" in str(exc):
            raise SystemExit(
                f"{exc}\nThe output directory holds runs of another configuration; pass another "
                "--out or the same --steps/--config as before."
            ) from None
        record.status, record.error = "failed", repr(exc)
    except Exception as exc:  # keep going: one broken run must not cost the hour of the others
        record.status, record.error = "failed", repr(exc)
    record.wall_s, record.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    if record.status == "failed":
        log.error("%s failed after %.0f s: %s", cfg.name, record.wall_s, record.error)
    else:
        log.info("%-34s done in %.0f s wall, %.0f s CPU", cfg.name, record.wall_s, record.cpu_s)
    return record


def run_proxy_method(plan: Plan, seed: int) -> None:
    """Proxy run (small LM, agent online), then the target run steered by its frozen policy."""
    from ray_jobs.proxy import proxy_and_target

    cfg = make_config(plan, f"ac_odm_proxy-s{seed}", seed, OVERRIDES["ac_odm_proxy"])
    proxy_cfg, target_cfg = proxy_and_target(cfg)
    proxy = run_one(plan, proxy_cfg, "ac_odm_proxy:proxy", "AC-ODM proxy run (small LM)", needs_policy=True)
    if proxy.status == "failed":
        return
    run_one(plan, target_cfg, "ac_odm_proxy", LABELS["ac_odm_proxy"])


def pick_best_static(plan: Plan, seed: int) -> str | None:
    """The grid key with the lowest final ``val/mean_ppl`` among the grid runs of ``seed``."""
    from analysis.metrics import final_value
    from analysis.runs import load_run

    finals = {}
    for key in plan.grid:
        run_dir = plan.runs_dir / f"static-{key}-s{seed}"
        if (run_dir / "ledger.parquet").exists():
            finals[key] = final_value(load_run(run_dir))
    return min(finals, key=finals.__getitem__) if finals else None


def run_plan(plan: Plan) -> str | None:
    """Every run, seed by seed (so a stopped benchmark has whole seeds); returns the best static key."""
    best = None
    for seed in plan.seeds:
        for method in plan.methods:
            if method == "ac_odm_proxy":
                run_proxy_method(plan, seed)
            elif method == "best_static":
                keys = list(plan.grid) if seed == plan.seeds[0] else ([best] if best else [])
                for key in keys:
                    cfg = make_config(
                        plan,
                        f"static-{key}-s{seed}",
                        seed,
                        {"agent.kind": "fixed", "agent.weights": plan.grid[key]},
                    )
                    run_one(plan, cfg, f"static:{key}", f"static {key}")
                if seed == plan.seeds[0]:
                    best = pick_best_static(plan, seed)
                    log.info("best static mixture of the grid (seed %d): %s", seed, best)
            else:
                run_one(
                    plan,
                    make_config(plan, f"{method}-s{seed}", seed, OVERRIDES[method]),
                    method,
                    LABELS[method],
                )
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
        "grid mixture (seed 0)",
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
        if runs[0].kind in ("uniform", "natural", "fixed"):
            continue
        for r in runs:
            led, names = r.ledger, r.domain_names
            weights_TK = led[[f"weight/{d}" for d in names]].to_numpy(float)
            late_K = weights_TK[-max(1, len(led) // 4) :].mean(axis=0)
            over_T = weights_TK.max(axis=1) > 0.5
            first = str(int(led["step"].iloc[int(over_T.argmax())])) if over_T.any() else "never"
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
    """Facts read off the comparison: each method against uniform (noise flagged), the AC-ODM goal check."""
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
    rivals = [m for m in t.index if m.startswith(("ODM", "best static"))]
    for m in [m for m in t.index if m.startswith("AC-ODM")]:
        r = t.loc[m, "step_ratio"]
        ahead = [o for o in rivals if r < t.loc[o, "step_ratio"] - spread]
        met = r <= 0.5 and len(ahead) == len(rivals)
        lines.append(
            f"Goal check, {m}: ratio {r:.2f} (goal: <= 0.5 and ahead of {', '.join(rivals) or 'no rival'} "
            f"by more than uniform's ratio spread {spread:.3f}): {'met' if met else 'not met'}; ahead of: "
            f"{', '.join(ahead) or 'none'}."
        )
    return lines


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def summarize(plan: Plan, best: str | None, header: dict[str, Any]) -> str:
    """The RESULTS.md section: provenance, the comparison, per-domain finals, grid, data, reading."""
    from analysis.report import comparison_table, domain_table, write_report

    runs, comparison = report_runs(plan, best)
    report = write_report(runs, plan.runs_dir.parent / "report", title="Sample efficiency on the demo corpus")
    counts = {s: sum(r.status == s for r in plan.records) for s in ("done", "skipped", "failed")}
    ran = [r for r in plan.records if r.status == "done"]
    cpu = sum(r.cpu_s for r in ran)
    steps = plan.base["train"]["total_steps"]
    parts = [
        f"## Sample efficiency on the demo corpus{' (--quick smoke run)' if header['quick'] else ''}",
        f"- Command: `{header['command']}` (base config `configs/bench-demo.yaml`, {steps} steps per run, "
        f"seeds {plan.seeds})",
        f"- Started {header['started']}; wall time {header['wall_s'] / 60:.1f} min for {counts['done']} runs "
        f"({counts['skipped']} complete runs reused, {counts['failed']} failed); CPU time of the runs "
        f"{cpu / 60:.1f} min (about the wall time on an idle machine at 1 thread per run)",
        f"- Machine: {header['machine']}; revision {header['revision']}",
        f"- Load average at start: {header['load_start']}; at end: {header['load_end']}",
        f"- Report with plots: `{_shown(report)}`",
        "",
        markdown_table(*comparison_table(comparison)),
        "",
        *[f"- {n}" for n in comparison.notes],
        "",
        "Final validation perplexity per domain:",
        "",
        markdown_table(*domain_table(comparison)),
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
        "--out",
        type=Path,
        default=None,
        help="output directory: runs/ and report/ (default runs/bench/sample_efficiency[_quick])",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per method (default 3; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default: the config's)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_ORDER,
        default=list(METHOD_ORDER),
        help="methods to run (uniform is needed for the target)",
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
    return args


def build_plan(args: argparse.Namespace) -> Plan:
    """The base config (with --quick/--steps/--threads applied), methods, seeds and directories."""
    base = load_yaml(args.config)
    edits: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        edits["train.total_steps"] = args.steps
    if args.threads is not None:
        edits["lm.num_threads"] = args.threads
        edits["proxy.lm.num_threads"] = args.threads
    for key, value in edits.items():
        set_dotted(base, key, value)
    out = args.out or REPO_ROOT / "runs" / "bench" / (
        "sample_efficiency_quick" if args.quick else "sample_efficiency"
    )
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    methods = [m for m in METHOD_ORDER if m in args.methods]
    if "uniform" not in methods:
        raise SystemExit(
            "--methods must include uniform: its best val/mean_ppl is the steps-to-target target"
        )
    ExperimentConfig.from_dict(base, source=str(args.config))  # fail now, not after an hour
    grid = static_grid(base, args.quick) if "best_static" in methods else {}
    return Plan(base=base, methods=methods, seeds=seeds, runs_dir=Path(out) / "runs", grid=grid)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, build the report, print the tables and append the RESULTS.md section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    plan = build_plan(args)
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    start_load, started, start_s = format_load(), utc_now(), time.perf_counter()
    log.info(
        "sample-efficiency benchmark: methods %s, seeds %s, %d steps, runs in %s; %s",
        plan.methods,
        plan.seeds,
        plan.base["train"]["total_steps"],
        plan.runs_dir,
        start_load,
    )
    best = run_plan(plan)
    text = summarize(
        plan,
        best,
        header={
            "command": command_line(),
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
