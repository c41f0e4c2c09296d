"""The numbers that compare methods: seed aggregates, steps-to-target, final perplexities, the table.

Rules (also written into every report by ``Comparison.notes``):

- Seeds: runs with the same method label are seeds of one method. Aggregates are the mean over seeds
  with a 95% Student-t interval (``mean +- t_{0.975, n-1} * sd / sqrt(n)``, sample sd); none for one seed.
- Target: ``--target`` when given; otherwise the best ``val/mean_ppl`` that *every* uniform seed
  reaches, i.e. the largest of the uniform seeds' best (minimum) values. The mean of the seeds' bests
  would leave the worse uniform seeds short of their own baseline's target, so uniform's steps-to-target
  and every ratio to it would be undefined; with one seed both rules give that seed's best.
- Steps-to-target of a run: the first evaluation at or below the target, linearly interpolated between
  that evaluation and the one before it (at the first evaluation itself when the first evaluation
  already reaches it: nothing is assumed before it); ``inf`` if never reached. Tokens-to-target
  interpolates the ledger's cumulative ``tokens`` at that (fractional) step.
- Ratio to uniform: the method's mean steps-to-target over uniform's mean steps-to-target.
- Noise: uniform's seed-to-seed spread is the sample sd of its seeds' final ``val/mean_ppl`` and of its
  seeds' steps-to-target divided by their mean (the spread of uniform's step ratio). A method whose
  difference from uniform is smaller than that spread is flagged as noise, not ranked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.runs import PER_RUN_KEYS, Run, config_differences

log = logging.getLogger(__name__)

DEFAULT_METRIC = "val/mean_ppl"
CONFIDENCE = 0.95
# Display order of method kinds; methods of the same kind keep the order in which they were given.
KIND_ORDER = ("uniform", "natural", "fixed", "smoothed_mean", "exp3", "mirror_descent", "greedy", "ac_odm")


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with the half-width of its confidence interval (NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def lo(self) -> float:
        """Lower end of the interval."""
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        """Upper end of the interval."""
        return self.mean + self.half_width


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value, e.g. 12.706 for 95% and 1 degree of freedom."""
    from scipy.special import stdtrit  # the t quantile; much lighter to import than scipy.stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return float(stdtrit(dof, (1 + confidence) / 2))


def mean_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-interval half-width of ``values``; any inf/NaN value makes the mean inf/NaN."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("mean_interval needs at least one value")
    if not np.all(np.isfinite(v)):
        return Interval(math.nan if np.isnan(v).any() else math.inf, math.nan, int(v.size))
    if v.size < 2:
        return Interval(float(v[0]), math.nan, 1)
    half = t_quantile(confidence, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(float(v.mean()), half, int(v.size))


def eval_points(run: Run, metric: str = DEFAULT_METRIC) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated steps of ``run`` and the metric's values there (rows where it is not NaN)."""
    if metric not in run.ledger.columns:
        raise ValueError(f"{run.source}: the ledger has no {metric!r} column (was the run ever evaluated?)")
    rows = run.ledger[["step", metric]].dropna()
    if rows.empty:
        raise ValueError(f"{run.source}: {metric!r} was never evaluated (all NaN)")
    return rows["step"].to_numpy(dtype=float), rows[metric].to_numpy(dtype=float)


def steps_to_target(steps: Sequence[float], values: Sequence[float], target: float) -> float:
    """First step at which ``values`` (lower is better) reach ``target``, interpolated; inf if never.

    Args:
        steps: evaluated steps, strictly increasing.
        values: the metric at those steps.
        target: the value to reach.

    Returns:
        ``steps[0]`` if the first evaluation reaches the target; otherwise the linear interpolation
        between the last evaluation above the target and the first at or below it; ``inf`` if none is.
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps and values must be non-empty 1-D arrays of one length, got {s.shape}, {v.shape}")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing")
    if not math.isfinite(target):
        raise ValueError(f"target must be finite, got {target}")
    hits = np.flatnonzero(v <= target)
    if hits.size == 0:
        return math.inf
    i = int(hits[0])
    if i == 0:
        return float(s[0])
    frac = (v[i - 1] - target) / (v[i - 1] - v[i])
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


def value_at_step(run: Run, column: str, step: float) -> float:
    """``column`` linearly interpolated at a (fractional) ``step``; inf for an infinite step."""
    if not math.isfinite(step):
        return math.inf
    rows = run.ledger[["step", column]].dropna()
    return float(np.interp(step, rows["step"].to_numpy(float), rows[column].to_numpy(float)))


def run_steps_to_target(run: Run, target: float, metric: str = DEFAULT_METRIC) -> float:
    """Steps-to-target of one run (module docstring rule)."""
    return steps_to_target(*eval_points(run, metric), target)


def best_value(run: Run, metric: str = DEFAULT_METRIC) -> float:
    """The best (lowest) evaluated value of ``metric`` in ``run``."""
    return float(np.min(eval_points(run, metric)[1]))


def final_value(run: Run, metric: str = DEFAULT_METRIC) -> float:
    """The value of ``metric`` at the run's last evaluation."""
    return float(eval_points(run, metric)[1][-1])


def final_domain_ppl(run: Run, metric: str = DEFAULT_METRIC) -> dict[str, float]:
    """``val/ppl/<domain>`` at the last evaluation (NaN where the ledger lacks it), in domain order."""
    last_step = eval_points(run, metric)[0][-1]
    row = run.ledger.loc[run.ledger["step"] == last_step].iloc[0]
    return {d: float(row.get(f"val/ppl/{d}", math.nan)) for d in run.domain_names}


def target_means(ppl_by_domain: Mapping[str, float], target_domains: Sequence[str]) -> tuple[float, float]:
    """Arithmetic and geometric mean of the perplexities of the target domains."""
    if not target_domains:
        raise ValueError("target_means needs at least one target domain")
    missing = [d for d in target_domains if d not in ppl_by_domain]
    if missing:
        raise ValueError(f"no perplexity for target domains {missing}")
    v = np.array([ppl_by_domain[d] for d in target_domains], dtype=float)
    if np.any(v <= 0):
        raise ValueError(f"perplexities must be positive, got {dict(zip(target_domains, v, strict=True))}")
    return float(v.mean()), float(np.exp(np.log(v).mean()))


def final_geo_ppl(run: Run, metric: str = DEFAULT_METRIC) -> float:
    """Final geometric mean ppl over target domains (from ``val/ppl/<d>``, else ``val/geo_mean_ppl``)."""
    ppl = final_domain_ppl(run, metric)
    if all(math.isfinite(ppl[d]) for d in run.target_domains):
        return target_means(ppl, run.target_domains)[1]
    if "val/geo_mean_ppl" in run.ledger.columns and run.ledger["val/geo_mean_ppl"].notna().any():
        return final_value(run, "val/geo_mean_ppl")
    return math.nan


def step_time(run: Run) -> float:
    """Median seconds per optimiser step (``time/step_s``; else from ``wall_time`` differences)."""
    if "time/step_s" in run.ledger.columns and run.ledger["time/step_s"].notna().any():
        return float(run.ledger["time/step_s"].median())
    rows = run.ledger[["step", "wall_time"]].dropna()
    if len(rows) < 2:
        return math.nan
    return float((rows["wall_time"].diff() / rows["step"].diff()).median())


def group_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method label, methods in ``KIND_ORDER``, seeds sorted; checks they are comparable."""
    if not runs:
        raise ValueError("no runs to compare")
    first = runs[0]
    for run in runs[1:]:
        if run.domain_names != first.domain_names or run.target_domains != first.target_domains:
            raise ValueError(
                f"runs are not comparable: {run.source} has domains {run.domain_names} "
                f"(targets {run.target_domains}) but {first.source} has {first.domain_names} "
                f"(targets {first.target_domains})"
            )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    for method, members in groups.items():
        seeds = [r.seed for r in members]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            names = [r.source for r in members if r.seed in dupes]
            raise ValueError(f"method {method!r} has several runs with seed(s) {dupes}: {names}; "
                             "give each run its own seed or its own method tag")
        members.sort(key=lambda r: r.seed)

    def rank(item: tuple[str, list[Run]]) -> int:
        kind = item[1][0].kind
        return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)

    return dict(sorted(groups.items(), key=rank))


def baseline_method(groups: Mapping[str, list[Run]]) -> str | None:
    """The label of the uniform baseline (the group whose runs have ``agent.kind: uniform``), if any."""
    uniform = [m for m, rs in groups.items() if all(r.is_uniform for r in rs)]
    if len(uniform) > 1:
        raise ValueError(f"several uniform baselines {uniform}; compare one at a time or tag them alike")
    return uniform[0] if uniform else None


def default_target(uniform_runs: Sequence[Run], metric: str = DEFAULT_METRIC) -> float:
    """The best ``metric`` reached by every uniform seed: the largest of the seeds' best values."""
    if not uniform_runs:
        raise ValueError("default_target needs at least one uniform run")
    return max(best_value(r, metric) for r in uniform_runs)


def aggregate_curve(
    runs: Sequence[Run], column: str, *, confidence: float = CONFIDENCE, smooth: int = 1
) -> pd.DataFrame:
    """Mean and t-interval over seeds of ``column`` at the steps every run recorded it.

    Args:
        runs: the seeds of one method.
        column: a ledger column; rows where it is NaN are ignored.
        confidence: interval level.
        smooth: rolling-mean window (in recorded points) applied to each run first.

    Returns:
        Columns ``step``, ``tokens`` (mean), ``mean``, ``lo``, ``hi``, ``n``; empty when no run has the column.
    """
    series, tokens = [], []
    for run in runs:
        if column not in run.ledger.columns:
            continue
        rows = run.ledger[["step", "tokens", column]].dropna(subset=[column]).set_index("step")
        if rows.empty:
            continue
        values = rows[column].astype(float)
        series.append(values.rolling(smooth, min_periods=1).mean() if smooth > 1 else values)
        tokens.append(rows["tokens"].astype(float))
    if not series:
        return pd.DataFrame(columns=["step", "tokens", "mean", "lo", "hi", "n"])
    table = pd.concat(series, axis=1, join="inner")
    toks = pd.concat(tokens, axis=1, join="inner").loc[table.index]
    n = table.shape[1]
    mean = table.mean(axis=1)
    if n > 1:
        half = t_quantile(confidence, n - 1) * table.std(axis=1, ddof=1) / math.sqrt(n)
    else:
        half = pd.Series(0.0, index=table.index)
    return pd.DataFrame({"step": table.index.to_numpy(), "tokens": toks.mean(axis=1).to_numpy(),
                         "mean": mean.to_numpy(), "lo": (mean - half).to_numpy(), "hi": (mean + half).to_numpy(),
                         "n": n})


@dataclass
class Comparison:
    """The comparison of methods: one table row per method, plus the rules and spreads behind it."""

    table: pd.DataFrame
    target: float | None  # None: no uniform run and no --target, so no steps-to-target
    target_rule: str
    metric: str
    baseline: str | None
    uniform_ppl_sd: float
    uniform_ratio_sd: float
    groups: dict[str, list[Run]]
    notes: list[str] = field(default_factory=list)

    @property
    def target_is_uniforms(self) -> bool:
        """True when the target is uniform's own (no ``--target``): uniform's ratio is then 1x by construction."""
        return self.baseline is not None and self.target is not None and "given with --target" not in self.target_rule


def compare(
    runs: Sequence[Run], *, target: float | None = None, metric: str = DEFAULT_METRIC, confidence: float = CONFIDENCE
) -> Comparison:
    """Build the comparison table (module docstring rules).

    Args:
        runs: every run to compare (several seeds per method); one run alone is a valid report.
        target: ``metric`` value for steps-to-target; default from the uniform baseline, and none (no
            steps-to-target, NaN in the table) when there is no uniform run either.
        metric: the evaluated metric (lower is better).
        confidence: interval level.

    Returns:
        A ``Comparison``; ``table`` has one row per method with columns ``method, seeds, final_ppl,
        final_ppl_ci, final_geo_ppl, final_geo_ppl_ci, steps_to_target, steps_to_target_ci, reached,
        step_ratio, tokens_to_target, step_time_s, step_time_s_ci, tokens, ppl_noise, ratio_noise``
        (``*_ci`` are interval half-widths; ``*_noise`` are None where not applicable).

    Raises:
        ValueError: a non-positive ``target``, incomparable runs, or runs without evaluations.
    """
    groups = group_by_method(runs)
    baseline = baseline_method(groups)
    if target is None:
        if baseline is None:
            rule = (f"No target: no uniform run among the {len(runs)} run(s) and no --target given, so no "
                    f"steps-to-target (pass --target <{metric}> for it, or add a run with agent.kind: uniform)")
        else:
            target = default_target(groups[baseline], metric)
            rule = (f"target {metric} = {target:.4g}: the best value every uniform seed reaches "
                    f"(the largest of the {len(groups[baseline])} uniform seeds' best values)")
    else:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"--target must be a positive finite {metric}, got {target}")
        rule = f"target {metric} = {target:.4g} (given with --target)"
    rows = {m: _method_row(m, rs, target, metric, confidence) for m, rs in groups.items()}
    ppl_sd, ratio_sd = math.nan, math.nan
    if baseline is not None:
        base = rows[baseline]
        finals = [final_value(r, metric) for r in groups[baseline]]
        steps_u = np.asarray(base.pop("_steps"), dtype=float)
        if len(finals) > 1:
            ppl_sd = float(np.std(finals, ddof=1))
            if np.all(np.isfinite(steps_u)):
                ratio_sd = float(np.std(steps_u / steps_u.mean(), ddof=1))
        base_steps = base["steps_to_target"]
        for method, row in rows.items():
            row.pop("_steps", None)
            row["step_ratio"] = row["steps_to_target"] / base_steps if math.isfinite(base_steps) else math.nan
            row["ppl_noise"] = row["ratio_noise"] = None
            if method == baseline:
                continue
            if not math.isnan(ppl_sd):
                row["ppl_noise"] = bool(abs(row["final_ppl"] - base["final_ppl"]) < ppl_sd)
            if not math.isnan(ratio_sd) and math.isfinite(row["step_ratio"]):
                row["ratio_noise"] = bool(abs(row["step_ratio"] - 1.0) < ratio_sd)
    else:
        for row in rows.values():
            row.pop("_steps", None)
            row.update(step_ratio=math.nan, ppl_noise=None, ratio_noise=None)
    table = pd.DataFrame(list(rows.values()))
    comparison = Comparison(table=table, target=None if target is None else float(target), target_rule=rule, metric=metric, baseline=baseline,
                            uniform_ppl_sd=ppl_sd, uniform_ratio_sd=ratio_sd, groups=groups)
    comparison.notes = _notes(comparison)
    return comparison


def _method_row(method: str, runs: list[Run], target: float | None, metric: str, confidence: float) -> dict:
    """One table row: per-seed values aggregated into means and intervals (steps-to-target NaN without a target)."""
    finals = mean_interval([final_value(r, metric) for r in runs], confidence)
    geos = mean_interval([final_geo_ppl(r, metric) for r in runs], confidence)
    steps = [math.nan if target is None else run_steps_to_target(r, target, metric) for r in runs]
    steps_iv = mean_interval(steps, confidence)
    tokens_iv = mean_interval([value_at_step(r, "tokens", s) for r, s in zip(runs, steps, strict=True)], confidence)
    times = mean_interval([step_time(r) for r in runs], confidence)
    return {
        "method": method, "seeds": len(runs),
        "final_ppl": finals.mean, "final_ppl_ci": finals.half_width,
        "final_geo_ppl": geos.mean, "final_geo_ppl_ci": geos.half_width,
        "steps_to_target": steps_iv.mean, "steps_to_target_ci": steps_iv.half_width,
        "reached": int(sum(math.isfinite(s) for s in steps)) if target is not None else 0,
        "tokens_to_target": tokens_iv.mean,
        "step_time_s": times.mean, "step_time_s_ci": times.half_width,
        "tokens": float(np.mean([r.ledger["tokens"].iloc[-1] for r in runs])),
        "_steps": steps,
    }


def _notes(c: Comparison) -> list[str]:
    """The rules and caveats printed under the table."""
    notes = [
        c.target_rule + ".",
        "Steps-to-target: first evaluation at or below the target, linearly interpolated between it and the "
        "evaluation before; 'not reached' if any seed never reaches it. Means over seeds with 95% "
        "Student-t intervals (\u00b1 half-width; none for one seed). Ratio = method's mean steps / uniform's.",
    ]
    if c.target_is_uniforms:
        notes.append(f"Uniform's steps-to-target is 1\u00d7 by construction: the target is uniform's own best "
                     f"{c.metric}, so the ratios say how much sooner (below 1\u00d7) or later another method gets "
                     "to where uniform ends up.")
    if c.baseline is None:
        notes.append("No uniform run: no ratios and no noise flags.")
    elif math.isnan(c.uniform_ppl_sd):
        notes.append("Uniform has one seed: its seed-to-seed spread is unknown, so no difference can be called "
                     "more than noise.")
    else:
        ratio = "n/a" if math.isnan(c.uniform_ratio_sd) else f"{c.uniform_ratio_sd:.3f}"
        notes.append(
            f"Uniform's seed-to-seed spread (sample sd): {c.uniform_ppl_sd:.4g} in final {c.metric}, {ratio} in "
            "step ratio. Differences smaller than these are noise (column \"within uniform's seed noise\") and are not "
            "ranked, between any two methods."
        )
    last_steps = {m: sorted({int(r.ledger["step"].iloc[-1]) for r in rs}) for m, rs in c.groups.items()}
    if len({s for steps in last_steps.values() for s in steps}) > 1:
        notes.append(f"Warning: the runs do not all end at the same step (last step per method: {last_steps}); "
                     "a shorter run's 'final' values come from an earlier point of training.")
    for method, runs in c.groups.items():
        differing = sorted(k for k in config_differences([r.config for r in runs]) if k not in PER_RUN_KEYS)
        if differing:
            notes.append(f"Warning: the runs of {method!r} differ in {differing}; are they really seeds of one method?")
    return notes


def per_domain_final(
    groups: Mapping[str, Sequence[Run]], metric: str = DEFAULT_METRIC, confidence: float = CONFIDENCE
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Final ``val/ppl/<domain>`` per method: (means, interval half-widths), methods x domains."""
    means, halves = {}, {}
    for method, runs in groups.items():
        per_run = [final_domain_ppl(r, metric) for r in runs]
        ivs = {d: mean_interval([p[d] for p in per_run], confidence) for d in runs[0].domain_names}
        means[method] = {d: iv.mean for d, iv in ivs.items()}
        halves[method] = {d: iv.half_width for d, iv in ivs.items()}
    return pd.DataFrame(means).T, pd.DataFrame(halves).T
