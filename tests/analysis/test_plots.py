"""Plots: each writes a non-empty PNG; colours are fixed mappings; bad inputs are clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.metrics import group_by_method
from analysis.plots import (
    domain_colors,
    method_colors,
    plot_agent_training,
    plot_domain_curves,
    plot_final_domain_bars,
    plot_metric_curves,
    plot_mixture_weights,
    plot_sweep,
    warmup_end,
)
from analysis.runs import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5_000


@pytest.fixture
def groups(run_dirs):
    return group_by_method([load_run(d) for dirs in run_dirs.values() for d in dirs])


def test_domain_colours_follow_domain_order():
    colors = domain_colors(["a", "b", "junk"])
    assert colors == domain_colors(["a", "b", "junk"])  # deterministic
    assert len(set(colors.values())) == 3
    assert domain_colors(["x", "y", "z"])["x"] == colors["a"]  # index-based, not name-based
    assert len(set(domain_colors([f"d{i}" for i in range(22)]).values())) == 22


def test_method_colours_give_uniform_black(groups):
    colors = method_colors(groups)
    assert colors["uniform"] == "#000000"
    assert len(set(colors.values())) == len(groups)


def test_every_plot_writes_a_png(groups, tmp_path):
    paths = [
        plot_metric_curves(groups, tmp_path / "curves.png", target=32.0),
        plot_domain_curves(groups, tmp_path / "domains.png"),
        plot_final_domain_bars(groups, tmp_path / "bars.png"),
        plot_agent_training(groups, tmp_path / "agent.png"),
        plot_mixture_weights(groups["AC-ODM (online)"], tmp_path / "weights.png"),
    ]
    for path in paths:
        assert path is not None and _is_png(path), path
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp file


def test_agent_plot_is_skipped_without_agent_signals(groups, tmp_path):
    static = {m: rs for m, rs in groups.items() if m in ("uniform", "natural")}
    for runs in static.values():
        for r in runs:
            del r.ledger["reward"]
    assert plot_agent_training(static, tmp_path / "agent.png") is None
    assert not (tmp_path / "agent.png").exists()


def test_weights_plot_needs_weight_columns(groups, tmp_path):
    run = groups["uniform"][0]
    del run.ledger["weight/b"]
    with pytest.raises(ValueError, match=r"lacks mixture weight columns \['weight/b'\]"):
        plot_mixture_weights([run], tmp_path / "w.png")


def test_sweep_plot_numeric_and_categorical_parameters(tmp_path):
    results = pd.DataFrame({
        "agent.actor_lr": [1e-5, 1e-4, 1e-3, 1e-2],
        "agent.exploration.kind": ["dirichlet", "logit_gaussian", "dirichlet", "logit_gaussian"],
        "agent.gamma": [0.9, 0.9, 0.9, 0.9],  # not swept: left out by default
        "val/mean_ppl": [40.0, 35.0, 33.0, 38.0],
    })
    assert _is_png(plot_sweep(results, tmp_path / "sweep.png"))
    with pytest.raises(ValueError, match="no 'val/loss' column"):
        plot_sweep(results, tmp_path / "x.png", metric="val/loss")
    with pytest.raises(ValueError, match="not varying columns"):
        plot_sweep(results, tmp_path / "x.png", params=["nope"])


def test_warmup_end_is_the_first_step_after_warmup(groups):
    assert warmup_end(groups["AC-ODM (online)"][0]) == 5.0
    assert warmup_end(groups["uniform"][0]) is None
