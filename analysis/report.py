"""``acodm report``: compare runs in ``report.md`` and one self-contained ``report.html`` with PNG plots.

Layout of ``out_dir``: ``report.md`` (plots linked from ``plots/``), ``report.html`` (the same content
with every plot embedded as base64, so the one file can be mailed or logged as an MLflow artifact) and
``plots/*.png``. Every file is written atomically (temp file, then rename). The rules behind the
numbers (target, interpolation, intervals, noise) are in ``analysis.metrics`` and printed in the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from analysis.metrics import Comparison, compare, per_domain_final
from analysis.plots import (
    plot_agent_training,
    plot_domain_curves,
    plot_final_domain_bars,
    plot_metric_curves,
    plot_mixture_weights,
    plot_train_loss_per_domain,
    plot_training_dynamics,
)
from analysis.runs import PER_RUN_KEYS, Run, config_differences, flatten_config, load_mlflow_runs, load_run
from envs.paths import require_absent_or_dir

log = logging.getLogger(__name__)

# Settings worth showing when every run shares them (the differing keys are listed in full).
SHARED_KEYS = ("lm.preset", "lm.seq_len", "train.total_steps", "sampler.micro_batch_size", "sampler.grad_accum",
               "ray.enabled", "ray.num_workers", "optim.lr", "eval.interval", "eval.max_batches", "data.prepared_dir")

Table = tuple[list[str], list[list[str]]]
SUMMARY_FILE = "summary.md"  # the comparison table and the verdict alone, what `acodm report` prints


def build_report(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, target: float | None = None,
    labels: Mapping[str, str] | None = None, title: str = "acodm run comparison", announce: bool = True,
) -> Path:
    """Load run directories and write the report (``acodm report RUN_DIR... --out DIR [--target X]``).

    Args:
        run_dirs: run directories (``config.yaml`` + ``ledger.parquet`` each).
        out_dir: where ``report.md``, ``report.html`` and ``plots/`` go (created if absent).
        target: ``val/mean_ppl`` target for steps-to-target; default: uniform's (see ``analysis.metrics``).
        labels: optional method label per run directory (as given), overriding tags and derived labels.
        title: the report's heading.
        announce: log where the report was written (off for a report written to a temporary directory).

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: a run directory, config or ledger is missing.
        FileExistsError / NotADirectoryError: ``out_dir`` (or a parent) is an existing file; nothing is written.
        ValueError: unreadable inputs, incomparable runs, or no uniform run and no ``target``.
    """
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    require_absent_or_dir(out_dir, "report --out")  # before any run is read or any file written
    labels = {str(Path(k)): v for k, v in (labels or {}).items()}
    runs = [load_run(d, method=labels.get(str(Path(d)))) for d in run_dirs]
    return write_report(runs, out_dir, target=target, title=title, announce=announce)


def build_mlflow_report(
    tracking_uri: str, experiment_name: str, out_dir: str | os.PathLike[str], *, target: float | None = None
) -> Path:
    """The same report over every finished run of an MLflow experiment."""
    runs = load_mlflow_runs(tracking_uri, experiment_name)
    if not runs:
        raise ValueError(f"MLflow experiment {experiment_name!r} at {tracking_uri} has no finished run with metrics")
    return write_report(runs, out_dir, target=target, title=f"acodm report: MLflow experiment {experiment_name}")


def write_report(
    runs: Sequence[Run], out_dir: str | os.PathLike[str], *, target: float | None = None,
    title: str = "acodm run comparison", announce: bool = True,
) -> Path:
    """Compare ``runs``, render the plots and write ``report.md`` and ``report.html``; returns the HTML path
    (logged unless ``announce`` is false).

    Raises:
        FileExistsError / NotADirectoryError: ``out_dir`` (or a parent) is an existing file; nothing is written.
    """
    require_absent_or_dir(out_dir, "report --out")
    comparison = compare(runs, target=target)
    out = Path(out_dir)
    plots = render_plots(comparison, out / "plots")
    sections = _sections(comparison, runs)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_runs, n_methods = len(runs), len(comparison.groups)
    intro = (f"{n_runs} run{'s' * (n_runs != 1)}, {n_methods} method{'s' * (n_methods != 1)}; generated {stamp}."
             + (" One seed per method (n=1): no confidence intervals, and no difference can be told from noise."
                if all(len(rs) == 1 for rs in comparison.groups.values()) else ""))
    sections["verdict"] = verdict(comparison)
    _write_text(out / "report.md", render_markdown(title, intro, sections, plots, out))
    _write_text(out / SUMMARY_FILE, _md_table(sections["comparison"]) + "\n\n" + sections["verdict"] + "\n")
    html_path = _write_text(out / "report.html", render_html(title, intro, sections, plots))
    if announce:
        log.info("report written: %s (and report.md, %d plots)", html_path, len(plots))
    return html_path


def render_plots(comparison: Comparison, plot_dir: Path) -> list[tuple[str, Path]]:
    """Every plot of the report as (caption, PNG path)."""
    groups, metric = comparison.groups, comparison.metric
    plots = [
        (f"Validation {metric} against steps and tokens",
         plot_metric_curves(groups, plot_dir / "val_mean_ppl.png", metric=metric, target=comparison.target)),
        ("Validation perplexity per domain", plot_domain_curves(groups, plot_dir / "val_ppl_per_domain.png")),
        ("Final validation perplexity per domain",
         plot_final_domain_bars(groups, plot_dir / "final_ppl_per_domain.png", metric=metric)),
    ]
    plots += [
        ("Training dynamics: train loss, gradient norm, learning rate, throughput, mixture entropy; "
         "validation against wall-clock time", plot_training_dynamics(groups, plot_dir / "training_dynamics.png")),
        ("Training loss per domain against tokens", plot_train_loss_per_domain(groups, plot_dir / "train_loss_per_domain.png")),
    ]
    agent = plot_agent_training(groups, plot_dir / "agent_training.png")
    if agent is not None:
        plots.append(("Reward and actor/critic losses", agent))
    for i, (method, runs) in enumerate(groups.items()):
        slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-") or "method"
        path = plot_mixture_weights(runs, plot_dir / f"weights_{i:02d}_{slug}.png")
        plots.append((f"Mixture weights: {method}", path))
    return plots


# ------------------------------------------------------------------------------------------------ tables
def _num(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "\u2014"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _pm(mean: float, half: float, digits: int = 4) -> str:
    if isinstance(half, float) and not math.isnan(half) and math.isfinite(mean):
        return f"{_num(mean, digits)} \u00b1 {_num(half, 2)}"
    return _num(mean, digits)


def _tokens(x: float) -> str:
    if not math.isfinite(x):
        return _num(x)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def comparison_table(c: Comparison) -> Table:
    """The headline table as strings (shared by the markdown and HTML renderings)."""
    header = ["method", "seeds", f"final {c.metric}", "final geo-mean ppl (targets)", "steps to target",
              "ratio to uniform", "tokens to target", "step time (s, median)", "tokens trained",
              "within uniform's seed noise"]
    rows = []
    for r in c.table.to_dict("records"):
        if c.target is None:
            steps = "\u2014 (no target)"
        elif math.isfinite(r["steps_to_target"]):
            steps = _pm(r["steps_to_target"], r["steps_to_target_ci"], 4)
        else:
            steps = f"not reached ({r['reached']}/{r['seeds']} seeds reached)"
        ratio = f"{r['step_ratio']:.3g}\u00d7" if math.isfinite(r["step_ratio"]) else "\u2014"
        if r["method"] == c.baseline and math.isfinite(r["step_ratio"]) and c.target_is_uniforms:
            ratio += " (by construction)"
        if r["method"] == c.baseline:
            noise = "baseline"
        else:
            flags = [name for name, key in (("ppl", "ppl_noise"), ("steps", "ratio_noise")) if r[key]]
            known = [r[k] is not None for k in ("ppl_noise", "ratio_noise")]
            noise = " + ".join(flags) if flags else ("neither" if all(known) else "n/a")
        rows.append([r["method"], str(r["seeds"]), _pm(r["final_ppl"], r["final_ppl_ci"]),
                     _pm(r["final_geo_ppl"], r["final_geo_ppl_ci"]), steps, ratio, _tokens(r["tokens_to_target"]) if math.isfinite(r["tokens_to_target"]) else "\u2014",
                     _pm(r["step_time_s"], r["step_time_s_ci"], 3), _tokens(r["tokens"]), noise])
    return header, rows


def domain_table(c: Comparison) -> Table:
    """Final per-domain validation perplexity per method (mean \u00b1 95% half-width)."""
    means, halves = per_domain_final(c.groups, c.metric)
    first = next(iter(c.groups.values()))[0]
    header = ["method"] + [d if d in first.target_domains else f"{d} (not a target)" for d in first.domain_names]
    rows = [[m] + [_pm(means.loc[m, d], halves.loc[m, d]) for d in first.domain_names] for m in means.index]
    return header, rows


def verdict(c: Comparison) -> str:
    """One honest sentence: which method ends lowest in ``c.metric`` and by how much against uniform,
    with the caveat that applies (one seed, or a difference inside uniform's seed-to-seed spread)."""
    t = c.table.set_index("method")
    best = str(t["final_ppl"].idxmin())
    if c.baseline is None:
        if len(t) == 1:
            return (f"Verdict: one method only ({best}, final {c.metric} {_num(t.loc[best, 'final_ppl'])}); "
                    "nothing to compare it with (add a uniform run for a verdict).")
        return (f"Verdict: {best} ends lowest ({c.metric} {_num(t.loc[best, 'final_ppl'])}); no uniform run, so no "
                "ratios and no noise estimate.")
    u = t.loc[c.baseline]
    others = t.drop(index=c.baseline)
    if others.empty:
        return f"Verdict: uniform only (final {c.metric} {_num(u['final_ppl'])}); nothing to compare it with."
    if best == c.baseline:
        best = str(others["final_ppl"].idxmin())
    row = t.loc[best]
    rel = (row["final_ppl"] / u["final_ppl"] - 1) * 100
    direction = "lower" if rel < 0 else "higher"
    text = (f"Verdict: {best} ends at {c.metric} {_num(row['final_ppl'])} against uniform's {_num(u['final_ppl'])} "
            f"({abs(rel):.1f}% {direction})")
    if math.isfinite(row["step_ratio"]):
        text += f" and reaches uniform's target in {row['step_ratio']:.2f}\u00d7 uniform's steps"
    elif c.target is not None:
        text += " and does not reach uniform's target"
    if rel >= 0:
        text += "; no method beats uniform"
    n = min(len(c.groups[best]), len(c.groups[c.baseline]))
    if n == 1:
        text += (". One seed each (n=1): this difference cannot be told from seed-to-seed noise; run more seeds "
                 "before calling a winner.")
    elif row["ppl_noise"]:
        text += f". That is inside uniform's seed-to-seed spread (sd {_num(c.uniform_ppl_sd, 3)}): not a win."
    else:
        text += f", beyond uniform's seed-to-seed spread (sd {_num(c.uniform_ppl_sd, 3)}, {n}+ seeds each)."
    return text


MAX_EPOCHS = 4.0  # passes over a domain beyond which repetition starts to cost (Muennighoff et al., 2023)


def manifest_train_tokens(run: Run) -> dict[str, int] | None:
    """Training tokens per domain from the run's prepared corpus ``manifest.json``; None when unreadable."""
    import json

    prepared = (run.config.get("data") or {}).get("prepared_dir")
    try:
        manifest = json.loads((Path(str(prepared)) / "manifest.json").read_text())
        return {d["name"]: int(d["splits"]["train"]["num_tokens"]) for d in manifest["domains"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_table(c: Comparison) -> tuple[Table, list[str]]:
    """Tokens trained per domain and passes (epochs) over each domain's training split, per method (mean
    over seeds), and a warning for every domain repeated more than ``MAX_EPOCHS`` times."""
    first = next(iter(c.groups.values()))[0]
    sizes = manifest_train_tokens(first)
    header = ["method"] + list(first.domain_names)
    rows, warnings = [], []
    for method, runs in c.groups.items():
        cells = [method]
        for d in first.domain_names:
            col = f"tokens/{d}"
            tokens = float(np.mean([r.ledger[col].sum() if col in r.ledger.columns else math.nan for r in runs]))
            if sizes and sizes.get(d):
                epochs = tokens / sizes[d]
                cells.append(f"{_tokens(tokens)} ({epochs:.2f} ep)")
                if epochs > MAX_EPOCHS:
                    warnings.append(f"Warning: {method} trained {epochs:.1f} epochs of {d} (more than {MAX_EPOCHS:g}): "
                                    "repeated data; the domain is too small for this budget and mixture.")
            else:
                cells.append(_tokens(tokens))
        rows.append(cells)
    if not sizes:
        warnings.append(f"No epochs: the prepared corpus's manifest.json is not readable from "
                        f"{(first.config.get('data') or {}).get('prepared_dir')!r}.")
    return (header, rows), warnings


def config_table(runs: Sequence[Run]) -> tuple[list[str], Table]:
    """(shared settings as 'key: value' lines, table of the keys that differ between runs)."""
    flat = [flatten_config(r.config) for r in runs]
    differing = config_differences([r.config for r in runs])
    shared = [f"{k}: {flat[0][k]}" for k in SHARED_KEYS if k in flat[0] and k not in differing]
    domains = ", ".join(d if d in runs[0].target_domains else f"{d} (not a target)" for d in runs[0].domain_names)
    shared.insert(0, f"domains: {domains}")
    keys = [k for k in differing if k not in PER_RUN_KEYS]
    header = ["run", "method", "seed", *keys]
    rows = [[r.name, r.method, str(r.seed), *(_short(f.get(k)) for k in keys)] for r, f in zip(runs, flat, strict=True)]
    return shared, (header, rows)


def _short(value: object, limit: int = 48) -> str:
    text = "\u2014" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _sections(c: Comparison, runs: Sequence[Run]) -> dict[str, object]:
    shared, differing = config_table(runs)
    data, data_warnings = data_table(c)
    return {"comparison": comparison_table(c), "notes": c.notes, "domains": domain_table(c),
            "data": data, "data_warnings": data_warnings,
            "shared": shared, "differing": differing,
            "runs": [f"{r.name}: {r.method}, seed {r.seed} ({r.source})" for r in runs]}


# --------------------------------------------------------------------------------------------- rendering
def _md_table(table: Table) -> str:
    header, rows = table
    esc = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def render_markdown(
    title: str, intro: str, s: dict, plots: list[tuple[str, Path]], out_dir: Path
) -> str:
    """The report as Markdown, plots linked relative to ``out_dir``."""
    parts = [f"# {title}", intro, "## Comparison", _md_table(s["comparison"]), f"**{s['verdict']}**",
             "\n".join(f"- {n}" for n in s["notes"]),
             "## Final validation perplexity per domain", _md_table(s["domains"]),
             "## Tokens and passes (epochs) per domain", _md_table(s["data"]),
             "\n".join(f"- {w}" for w in s["data_warnings"]) or f"No domain is repeated more than {MAX_EPOCHS:g} epochs.",
             "## Plots"]
    for caption, path in plots:
        parts.append(f"### {caption}\n\n![{caption}]({path.relative_to(out_dir).as_posix()})")
    parts += ["## Configs compared", "Shared: " + "; ".join(s["shared"]) + ".",
              "Keys that differ between runs:" if len(s["differing"][0]) > 3 else "No other key differs.",
              _md_table(s["differing"]), "## Runs", "\n".join(f"- {r}" for r in s["runs"])]
    return "\n\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
        "li{margin:0.3em 0}")


def render_html(title: str, intro: str, s: dict, plots: list[tuple[str, Path]]) -> str:
    """The report as one self-contained HTML page (plots embedded as base64 PNG)."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1><p>{e(intro)}</p>",
             "<h2>Comparison</h2>", _html_table(s["comparison"]), f"<p><b>{e(s['verdict'])}</b></p>",
             "<ul>" + "".join(f"<li>{e(n)}</li>" for n in s["notes"]) + "</ul>",
             "<h2>Final validation perplexity per domain</h2>", _html_table(s["domains"]),
             "<h2>Tokens and passes (epochs) per domain</h2>", _html_table(s["data"]),
             "<ul>" + "".join(f"<li>{e(w)}</li>" for w in s["data_warnings"]) + "</ul>",
             "<h2>Plots</h2>"]
    for caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{e(caption)}</h3><img alt='{e(caption)}' src='data:image/png;base64,{data}'>")
    parts += ["<h2>Configs compared</h2>", "<p>Shared: " + e("; ".join(s["shared"])) + ".</p>",
              _html_table(s["differing"]), "<h2>Runs</h2>",
              "<ul>" + "".join(f"<li>{e(r)}</li>" for r in s["runs"]) + "</ul></body></html>"]
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def log_report_to_mlflow(out_dir: str | os.PathLike[str], run_id: str, tracking_uri: str,
                         artifact_path: str = "report") -> None:
    """Log a written report directory (``report.md``, ``report.html``, ``plots/``) as MLflow run artifacts.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``report.html`` (build the report first).
    """
    out = Path(out_dir)
    if not (out / "report.html").is_file():
        raise FileNotFoundError(f"{out / 'report.html'} does not exist: run build_report first")
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).log_artifacts(run_id, str(out), artifact_path=artifact_path)
