"""PNG plots of runs and comparisons (matplotlib, no pyplot: figures render with the Agg canvas).

Every plot has a title, axis labels with units and a legend. Colours are fixed mappings: a domain's
colour comes from its index in the config's domain order (``domain_colors``), a method's from its
position in the comparison with uniform always black (``method_colors``), so one domain or method has
the same colour in every plot of a report. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from analysis.metrics import (
    DEFAULT_METRIC,
    aggregate_curve,
    baseline_method,
    final_value,
    mean_interval,
    per_domain_final,
)
from analysis.runs import Run

# Okabe-Ito (colour-blind safe), without yellow; uniform takes black.
_METHOD_PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#999999")
_UNIFORM_COLOR = "#000000"
_DPI = 110


def domain_colors(domain_names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A colour per domain from its index: tab10 up to 10 domains, tab20 up to 20, then evenly spaced hues."""
    k = len(domain_names)
    if k <= 10:
        cmap, idx = matplotlib.colormaps["tab10"], range(k)
    elif k <= 20:
        cmap, idx = matplotlib.colormaps["tab20"], range(k)
    else:
        cmap, idx = matplotlib.colormaps["hsv"], (i / k for i in range(k))
    return {name: tuple(cmap(i)) for name, i in zip(domain_names, idx, strict=True)}


def method_colors(groups: Mapping[str, Sequence[Run]]) -> dict[str, str]:
    """A colour per method: black for the uniform baseline, then a colour-blind-safe palette in order."""
    out, i = {}, 0
    for method, runs in groups.items():
        if all(r.is_uniform for r in runs):
            out[method] = _UNIFORM_COLOR
            continue
        palette = _METHOD_PALETTE if i < len(_METHOD_PALETTE) else [matplotlib.colormaps["Dark2"](i % 8)]
        out[method] = palette[i % len(palette)]
        i += 1
    return out


_KIND_LINESTYLE = {"uniform": "-", "natural": "--", "fixed": "--", "smoothed_mean": "-.", "exp3": "-."}


def method_styles(groups: Mapping[str, Sequence[Run]]) -> dict[str, tuple[str, object]]:
    """(colour, line style) per method: static mixers dashed, bandits dash-dot, AC-ODM and others solid."""
    colors = method_colors(groups)
    return {m: (colors[m], _KIND_LINESTYLE.get(runs[0].kind, "-")) for m, runs in groups.items()}


def save_figure(fig: Figure, out_path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG atomically; returns the path."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", dpi=_DPI)
    os.replace(tmp, path)
    return path


def _downsample(x: np.ndarray, ys: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin means along the last axis so a long run draws at most ``max_points`` points."""
    n = x.size
    if n <= max_points:
        return x, ys
    edges = np.linspace(0, n, max_points + 1).astype(int)
    xb = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    yb = np.stack([ys[..., a:b].mean(axis=-1) for a, b in zip(edges[:-1], edges[1:], strict=True)], axis=-1)
    return xb, yb


def _fit_axis(ax: object, means: list[np.ndarray], *, log_ratio: float | None = 5.0) -> None:
    """Y limits from the mean curves (wide seed bands are clipped, not allowed to squash the curves).

    With ``log_ratio``, a log scale with plain-number ticks is used when the means span more than that
    factor (perplexity falls by orders of magnitude early in training).
    """
    values = np.concatenate([np.asarray(m, dtype=float) for m in means]) if means else np.array([])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    if log_ratio is not None and lo > 0 and hi / lo > log_ratio:
        ax.set_yscale("log")  # type: ignore[attr-defined]
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # type: ignore[attr-defined]
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # type: ignore[attr-defined]
        ax.yaxis.set_minor_formatter(NullFormatter())  # type: ignore[attr-defined]
        ax.set_ylim(lo / 1.15, hi * 1.15)  # type: ignore[attr-defined]
        return
    pad = 0.12 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-3)
    ax.set_ylim(lo - pad, hi + pad)  # type: ignore[attr-defined]


def _weights(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(steps, weights_KT) of a run's ledger."""
    cols = [f"weight/{d}" for d in run.domain_names]
    missing = [c for c in cols if c not in run.ledger.columns]
    if missing:
        raise ValueError(f"{run.source}: the ledger lacks mixture weight columns {missing}")
    rows = run.ledger[["step", *cols]].dropna()
    return rows["step"].to_numpy(float), rows[cols].to_numpy(float).T


def warmup_end(run: Run) -> float | None:
    """The first step after the agent's warmup (``agent/warmup`` drops from 1 to 0), if the run logged it."""
    if "agent/warmup" not in run.ledger.columns:
        return None
    rows = run.ledger[["step", "agent/warmup"]].dropna()
    after = rows.loc[rows["agent/warmup"] == 0, "step"]
    if after.empty or not (rows["agent/warmup"] > 0).any():
        return None
    return float(after.iloc[0])


def plot_mixture_weights(runs: Sequence[Run], out_path: str | os.PathLike[str], *, max_points: int = 200) -> Path:
    """Stacked area of the mixture weights over steps, one panel per run (the seeds of one method).

    Long runs are drawn as the mean weight over windows of steps (at most ``max_points`` windows), which is
    the mixture the LM actually saw over that window; per-step exploration noise would hide the trend.
    """
    if not runs:
        raise ValueError("plot_mixture_weights needs at least one run")
    colors = domain_colors(runs[0].domain_names)
    series = [_weights(run) for run in runs]
    # static mixers: every seed has the same weights, so one panel says it all
    same = all(a.shape == series[0][1].shape and np.allclose(a, series[0][1]) for _, a in series[1:])
    panels = [(series[0], f"all {len(runs)} seeds (identical weights)")] if same and len(runs) > 1 else [
        (s, f"{run.name} (seed {run.seed})") for s, run in zip(series, runs, strict=True)]
    fig = Figure(figsize=(10, 2.3 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for i, (ax, ((steps, weights_KT), title)) in enumerate(zip(axes, panels, strict=True)):
        x, ys = _downsample(steps, weights_KT, max_points)
        ax.stackplot(x, ys, colors=[colors[d] for d in runs[0].domain_names], labels=runs[0].domain_names,
                     linewidth=0)
        ax.set_ylim(0, 1)
        ax.set_xlim(x[0], x[-1])
        ax.set_ylabel("mixture weight\n(fraction of batch)")
        ax.set_title(title, fontsize=10)
        end = warmup_end(runs[i])
        if end is not None:
            ax.axvline(end, color="black", linestyle="--", linewidth=1.2, label="end of agent warmup")
    window = math.ceil(len(series[0][0]) / max_points)
    axes[-1].set_xlabel("optimiser step" + (f" (mean weight per {window}-step window)" if window > 1 else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper", title="domain")
    fig.suptitle(f"Mixture weights over training: {runs[0].method}")
    return save_figure(fig, out_path)


def _interval_legend(groups: Mapping[str, Sequence[Run]], shape: str) -> str:
    """The legend title's line about intervals: a 95% CI only exists for methods with several seeds."""
    sizes = {len(rs) for rs in groups.values()}
    if sizes == {1}:
        return "method (seeds)\nn=1: no interval"
    if 1 in sizes:
        return f"method (seeds)\n{shape} = 95% CI (n>1 only)"
    return f"method (seeds)\n{shape} = 95% CI"


def _band(
    ax: object, x: np.ndarray, curve: pd.DataFrame, color: str, linestyle: object, label: str, *, marker: str = ""
) -> None:
    """The seed-mean curve, with its 95% band when there are several seeds."""
    ax.plot(x, curve["mean"], color=color, linestyle=linestyle, label=label, linewidth=1.6,  # type: ignore[attr-defined]
            marker=marker, markersize=3.5)
    if curve["n"].iloc[0] > 1:
        ax.fill_between(x, curve["lo"], curve["hi"], color=color, alpha=0.15, linewidth=0)  # type: ignore[attr-defined]


def plot_metric_curves(
    groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str], *,
    metric: str = DEFAULT_METRIC, target: float | None = None,
) -> Path:
    """``metric`` per method (mean over seeds, 95% band): against steps, zoomed on the second half, and
    against tokens. The zoom is where the methods separate and where steps-to-target is decided."""
    styles = method_styles(groups)
    fig = Figure(figsize=(16, 5.0), layout="constrained")
    ax_steps, ax_zoom, ax_tokens = fig.subplots(1, 3)
    values, late = [], []
    for method, runs in groups.items():
        curve = aggregate_curve(runs, metric)
        if curve.empty:
            continue
        label = f"{method} (n={len(runs)})"
        for ax, x in ((ax_steps, curve["step"]), (ax_zoom, curve["step"]), (ax_tokens, curve["tokens"])):
            _band(ax, x.to_numpy(float), curve, *styles[method], label, marker="o")
        values.append(curve["mean"].to_numpy(float))
        late.append(curve.loc[curve["step"] >= curve["step"].max() / 2, "mean"].to_numpy(float))
    if not values:
        raise ValueError(f"no run has evaluated {metric!r}; nothing to plot")
    extra = [np.array([target])] if target is not None else []
    _fit_axis(ax_steps, values + extra)
    _fit_axis(ax_tokens, values + extra)
    _fit_axis(ax_zoom, late + extra, log_ratio=None)
    last_step = max(float(r.ledger["step"].max()) for rs in groups.values() for r in rs)
    ax_zoom.set_xlim(last_step / 2 * 0.97, last_step * 1.01)
    for ax in (ax_steps, ax_zoom, ax_tokens):
        if target is not None:
            ax.axhline(target, color="0.4", linestyle=(0, (1, 1)), linewidth=1.2, label=f"target {target:.4g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel(f"{metric} (perplexity, lower is better)")
    ax_steps.set_xlabel("optimiser step")
    ax_zoom.set_xlabel("optimiser step (second half of training)")
    ax_tokens.set_xlabel("tokens trained")
    ax_tokens.xaxis.set_major_formatter(EngFormatter())
    ax_steps.set_title("against optimiser steps", fontsize=10)
    ax_zoom.set_title("zoom: second half of training", fontsize=10)
    ax_tokens.set_title("against tokens trained", fontsize=10)
    handles, labels = ax_tokens.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title=_interval_legend(groups, "band"))
    fig.suptitle(f"Validation {metric} (mean perplexity over target domains) per method, mean over seeds;"
                 " dots = evaluations")
    return save_figure(fig, out_path)


def plot_domain_curves(groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str]) -> Path:
    """Per-domain validation perplexity against steps: one panel per domain, one line per method."""
    first = next(iter(groups.values()))[0]
    domains, dcolors, styles = first.domain_names, domain_colors(first.domain_names), method_styles(groups)
    ncols = min(3, len(domains))
    nrows = math.ceil(len(domains) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    curves = {d: {m: aggregate_curve(rs, f"val/ppl/{d}") for m, rs in groups.items()} for d in domains}
    spans = [c["mean"].max() / c["mean"].min() for per in curves.values() for c in per.values() if not c.empty]
    log_ratio = 5.0 if spans and max(spans) > 5.0 else None  # one scale decision for every panel
    for ax, domain in zip(axes, domains, strict=False):
        values = []
        for method, curve in curves[domain].items():
            if not curve.empty:
                label = f"{method} (n={len(groups[method])})"
                _band(ax, curve["step"].to_numpy(float), curve, *styles[method], label, marker="o")
                values.append(curve["mean"].to_numpy(float))
        _fit_axis(ax, values, log_ratio=1.0 if log_ratio else None)
        role = "" if domain in first.target_domains else " (not a target)"
        ax.set_title(f"{domain}{role}", color=dcolors[domain], fontweight="bold")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation perplexity")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(domains):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), title="method")
    several = any(len(rs) > 1 for rs in groups.values())
    fig.suptitle("Validation perplexity per domain" + (" (mean over seeds, 95% band)" if several else " (n=1)"))
    return save_figure(fig, out_path)


def plot_final_domain_bars(
    groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str], *, metric: str = DEFAULT_METRIC
) -> Path:
    """Final per-domain validation perplexity: one bar group per domain (plus ``metric``), one bar per method.

    Top: absolute values with 95% intervals. Bottom, when a uniform baseline is present: each method's mean
    relative to uniform's in percent, where differences of a few percent become visible.
    """
    means, halves = per_domain_final(groups, metric)
    first = next(iter(groups.values()))[0]
    domains, dcolors, colors = first.domain_names, domain_colors(first.domain_names), method_colors(groups)
    # an extra group: the runs' own final val/mean_ppl (arithmetic mean over the target domains)
    summary = {m: mean_interval([final_value(r, metric) for r in rs]) for m, rs in groups.items()}
    means[metric] = [summary[m].mean for m in means.index]
    halves[metric] = [summary[m].half_width for m in means.index]
    columns, methods = [*domains, metric], list(means.index)
    baseline = baseline_method(groups)
    nrows = 2 if baseline is not None and len(methods) > 1 else 1
    width_in = min(16.0, max(8.0, 0.4 * len(columns) * len(methods) + 3.5))
    fig = Figure(figsize=(width_in, 3.8 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    width, x = 0.8 / len(methods), np.arange(len(columns))
    panels = [(axes[0], means, halves, "final validation perplexity")]
    if nrows == 2:
        ref = means.loc[baseline]
        panels.append((axes[1], (means / ref - 1) * 100, halves / ref * 100,
                       "relative to uniform (%)\nbelow 0 = lower perplexity"))
    for ax, values, errs, ylabel in panels:
        for j, method in enumerate(methods):
            if ax is not axes[0] and method == baseline:
                continue
            err = errs.loc[method, columns].to_numpy(float)
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, values.loc[method, columns].to_numpy(float), width,
                   yerr=None if np.isnan(err).all() else np.nan_to_num(err, nan=0.0), capsize=2,  # n=1: no whisker
                   color=colors[method], label=f"{method} (n={len(groups[method])})",
                   error_kw={"ecolor": "#888888", "elinewidth": 1.2})
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    if nrows == 2:
        axes[1].axhline(0, color="black", linewidth=1)
    labels = [d if d in first.target_domains else f"{d}\n(not a target)" for d in domains]
    # slanted, so that long domain names never run into each other
    axes[-1].set_xticks(x, [*labels, f"{metric}\n(mean over targets)"], rotation=25, ha="right",
                        rotation_mode="anchor")
    for tick, domain in zip(axes[-1].get_xticklabels(), domains, strict=False):
        tick.set_color(dcolors[domain])
        tick.set_fontweight("bold")
    axes[-1].set_xlabel("domain (tick colour = the domain's colour in every plot)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title=_interval_legend(groups, "whisker"))
    several = any(len(rs) > 1 for rs in groups.values())
    fig.suptitle("Final validation perplexity per domain" + (" (mean over seeds)" if several else " (n=1)"))
    return save_figure(fig, out_path)


_AGENT_PANELS = (("reward", "env reward (per step)"), ("agent/critic_loss", "critic loss (TD, per update)"),
                 ("agent/actor_loss", "actor loss (-Q, per update)"))


def plot_agent_training(
    groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str], *, windows: int = 20
) -> Path | None:
    """Reward, critic loss and actor loss over steps per method (rolling mean, then mean over seeds).

    Args:
        groups: runs per method.
        out_path: the PNG to write.
        windows: the rolling mean spans 1/``windows`` of each run's recorded points (per-step RL signals
            are too noisy to read raw).

    Returns:
        The path, or None when no run recorded any of these columns (e.g. only static mixers).
    """
    styles = method_styles(groups)
    fig = Figure(figsize=(16, 4.4), layout="constrained")
    axes = fig.subplots(1, len(_AGENT_PANELS))
    handles: dict[str, object] = {}
    for ax, (column, ylabel) in zip(axes, _AGENT_PANELS, strict=True):
        means = []
        for method, runs in groups.items():
            points = max((int(r.ledger[column].notna().sum()) for r in runs if column in r.ledger.columns), default=0)
            curve = aggregate_curve(runs, column, smooth=max(1, points // windows)) if points else pd.DataFrame()
            if curve.empty:
                continue
            _band(ax, curve["step"].to_numpy(float), curve, *styles[method], f"{method} (n={len(runs)})")
            handles.setdefault(method, ax.lines[-1])
            means.append(curve["mean"].to_numpy(float))
            ends = [e for e in (warmup_end(r) for r in runs) if e is not None]
            if ends:
                ax.axvline(float(np.median(ends)), color=styles[method][0], linestyle=":", linewidth=1.2)
        _fit_axis(ax, means, log_ratio=None)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(ylabel.split(" (")[0], fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if not handles:
        return None
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()],  # type: ignore[attr-defined]
               loc="outside right upper", title=_interval_legend(groups, "band"))
    fig.suptitle(f"Agent training signals (rolling mean over 1/{windows} of the run, then mean over seeds;"
                 " dotted vertical line = end of the agent's warmup)")
    return save_figure(fig, out_path)


def plot_sweep(
    results: pd.DataFrame, out_path: str | os.PathLike[str], *, metric: str = DEFAULT_METRIC,
    params: Sequence[str] | None = None, mode: str = "min",
) -> Path:
    """Sweep results: ``metric`` against each swept parameter (one panel each), best trial starred.

    Args:
        results: one row per trial, with a ``metric`` column and one column per swept parameter.
        out_path: the PNG to write.
        metric: the column plotted on the y axis.
        params: the swept columns; default: every other column with more than one distinct value.
        mode: ``min`` or ``max``: which trial is best.
    """
    if metric not in results.columns:
        raise ValueError(f"sweep results have no {metric!r} column; columns: {list(results.columns)}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if params is None:
        params = [c for c in results.columns if c != metric and results[c].nunique(dropna=True) > 1]
    unknown = [p for p in params if p not in results.columns]
    if unknown or not params:
        raise ValueError(f"sweep parameters {unknown or params} are not varying columns of the results")
    data = results.dropna(subset=[metric])
    best = data[metric].idxmin() if mode == "min" else data[metric].idxmax()
    fig = Figure(figsize=(4.4 * len(params), 4.0), layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=True):
        col = data[param]
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if numeric:
            x = col.to_numpy(float)
            if np.all(x > 0) and x.max() / x.min() >= 20:
                ax.set_xscale("log")
        else:
            cats = sorted(col.astype(str).unique())
            x = col.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(float)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.scatter(x, data[metric], color="#0072B2", alpha=0.75, label="trial")
        bx = x[data.index.get_loc(best)]
        ax.scatter([bx], [data.loc[best, metric]], marker="*", s=220, color="#D55E00", zorder=3, label="best trial")
        ax.set_xlabel(param)
        ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
        ax.set_title(f"{metric} vs {param}", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Sweep results ({len(data)} trials)")
    return save_figure(fig, out_path)


def with_derived_columns(run: Run) -> Run:
    """A copy of ``run`` whose ledger also has the columns the training-dynamics plots read:
    ``derived/tokens_per_s`` (the step's tokens over its ``time/step_s``), ``derived/mix_entropy`` (nats of
    the mixture weights; log K is uniform) and ``derived/wall_min`` (wall-clock minutes)."""
    import dataclasses

    ledger = run.ledger.copy()
    if "time/step_s" in ledger.columns:
        ledger["derived/tokens_per_s"] = ledger["tokens"].diff() / ledger["time/step_s"]
    cols = [f"weight/{d}" for d in run.domain_names]
    if all(c in ledger.columns for c in cols):
        w = ledger[cols].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ledger["derived/mix_entropy"] = -np.nansum(np.where(w > 0, w * np.log(w), 0.0), axis=1)
        ledger.loc[np.isnan(w).any(axis=1), "derived/mix_entropy"] = np.nan
    if "wall_time" in ledger.columns:
        ledger["derived/wall_min"] = ledger["wall_time"] / 60.0
    return dataclasses.replace(run, ledger=ledger)


_DYNAMICS_PANELS = (("loss", "train loss (nats/token)", "optimiser step"),
                    ("grad_norm", "gradient norm (before clipping)", "optimiser step"),
                    ("lr", "learning rate", "optimiser step"),
                    ("derived/tokens_per_s", "throughput (tokens/s)", "optimiser step"),
                    ("derived/mix_entropy", "mixture entropy (nats)", "optimiser step"),
                    ("val/mean_ppl", "val/mean_ppl", "wall-clock time (minutes)"))


def plot_training_dynamics(
    groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str], *, windows: int = 20
) -> Path:
    """What a pretraining engineer checks first: train loss, gradient norm, learning rate, throughput and
    mixture entropy against steps (rolling mean over 1/``windows`` of the run, then mean over seeds), and
    validation perplexity against wall-clock time."""
    groups = {m: [with_derived_columns(r) for r in rs] for m, rs in groups.items()}
    styles = method_styles(groups)
    fig = Figure(figsize=(16, 8.2), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    handles: dict[str, object] = {}
    k = len(next(iter(groups.values()))[0].domain_names)
    for ax, (column, ylabel, xlabel) in zip(axes, _DYNAMICS_PANELS, strict=True):
        means = []
        for method, runs in groups.items():
            smooth = 1 if column.startswith("val/") or column == "lr" else max(1, len(runs[0].ledger) // windows)
            curve = aggregate_curve(runs, column, smooth=smooth)
            if curve.empty:
                continue
            if column.startswith("val/"):  # against each seed's mean wall-clock at the evaluated steps
                walls = aggregate_curve(runs, "derived/wall_min").set_index("step")["mean"]
                x = walls.reindex(curve["step"]).to_numpy(float)
            else:
                x = curve["step"].to_numpy(float)
            _band(ax, x, curve, *styles[method], f"{method} (n={len(runs)})",
                  marker="o" if column.startswith("val/") else "")
            handles.setdefault(method, ax.lines[-1])
            means.append(curve["mean"].to_numpy(float))
        if column == "derived/mix_entropy":
            ax.axhline(math.log(k), color="0.4", linestyle=(0, (1, 1)), linewidth=1.2)
            ax.annotate(f"uniform = log {k}", (0.02, math.log(k)), xycoords=("axes fraction", "data"),
                        va="top", fontsize=8, color="0.3")
            means.append(np.array([math.log(k)]))
        if means:
            _fit_axis(ax, means, log_ratio=5.0 if column.startswith("val/") else None)
        else:
            ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes)
        if column == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if column == "derived/tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.set_title(ylabel.split(" (")[0], fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()],  # type: ignore[attr-defined]
               loc="outside right upper", title=_interval_legend(groups, "band"))
    fig.suptitle(f"Training dynamics (rolling mean over 1/{windows} of the run, then mean over seeds)")
    return save_figure(fig, out_path)


def plot_train_loss_per_domain(
    groups: Mapping[str, Sequence[Run]], out_path: str | os.PathLike[str], *, windows: int = 20
) -> Path:
    """Training loss on each domain's micro-batches against tokens trained: one panel per domain, one line
    per method (rolling mean over 1/``windows`` of the run, then mean over seeds)."""
    first = next(iter(groups.values()))[0]
    domains, dcolors, styles = first.domain_names, domain_colors(first.domain_names), method_styles(groups)
    ncols = min(3, len(domains))
    nrows = math.ceil(len(domains) / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, domain in zip(axes, domains, strict=False):
        values = []
        for method, runs in groups.items():
            curve = aggregate_curve(runs, f"loss/{domain}", smooth=max(1, len(runs[0].ledger) // windows))
            if not curve.empty:
                _band(ax, curve["tokens"].to_numpy(float), curve, *styles[method], f"{method} (n={len(runs)})")
                values.append(curve["mean"].to_numpy(float))
        _fit_axis(ax, values, log_ratio=None)
        role = "" if domain in first.target_domains else " (not a target)"
        ax.set_title(f"{domain}{role}", color=dcolors[domain], fontweight="bold")
        ax.set_xlabel("tokens trained")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("train loss (nats/token)")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(domains):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), title="method")
    fig.suptitle(f"Training loss per domain (rolling mean over 1/{windows} of the run, then mean over seeds)")
    return save_figure(fig, out_path)
