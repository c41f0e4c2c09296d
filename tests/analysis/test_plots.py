"""Plots: the figures draw the data they were given (read back from the matplotlib objects), the PNGs
decode to images of the figure's size with content; colours are fixed mappings; bad inputs are clear
errors. Expected values come from the synthetic runs of ``conftest.py`` (``CURVES``, ``HALF_GAP``)."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from analysis import plots
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
from tests.analysis.conftest import CURVES, EVAL_STEPS, HALF_GAP

AC = "AC-ODM (online)"


@pytest.fixture
def groups(run_dirs):
    return group_by_method([load_run(d) for dirs in run_dirs.values() for d in dirs])


@pytest.fixture
def figures(monkeypatch) -> dict[str, Figure]:
    """Every figure the plots save, by file name (``save_figure`` still writes it)."""
    saved: dict[str, Figure] = {}
    real = plots.save_figure

    def capture(fig, out_path):
        path = real(fig, out_path)
        saved[path.name] = fig
        return path

    monkeypatch.setattr(plots, "save_figure", capture)
    return saved


def seed_mean(kind: str, transform=lambda m: m) -> np.ndarray:
    """Mean over seeds of ``transform(val/mean_ppl)`` at each evaluation step of the synthetic runs."""
    return np.mean([[transform(m) for m in curve] for _, curve, _ in CURVES[kind]], axis=0)


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def assert_png_of(path, fig: Figure) -> None:
    """``path`` decodes to an RGBA image of the figure's size in pixels, and is not blank."""
    image = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * plots._DPI
    assert image.shape == (round(height), round(width), 4), path
    drawn = np.any(image[..., :3] < 0.9, axis=-1).mean()  # share of pixels that are not (near) white
    assert 0.01 < drawn < 0.9, (path, drawn)
    assert len(np.unique(image.reshape(-1, 4), axis=0)) > 50, path  # lines, text, colours: not flat


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


def test_every_plot_writes_a_png_of_its_figure(groups, figures, tmp_path):
    paths = [
        plot_metric_curves(groups, tmp_path / "curves.png", target=32.0),
        plot_domain_curves(groups, tmp_path / "domains.png"),
        plot_final_domain_bars(groups, tmp_path / "bars.png"),
        plot_agent_training(groups, tmp_path / "agent.png"),
        plot_mixture_weights(groups[AC], tmp_path / "weights.png"),
    ]
    assert sorted(figures) == sorted(p.name for p in paths)
    for path in paths:
        assert_png_of(path, figures[path.name])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp file


def test_metric_curves_draw_the_seed_means(groups, figures, tmp_path):
    plot_metric_curves(groups, tmp_path / "curves.png", target=32.0)
    ax_steps, ax_zoom, ax_tokens = figures["curves.png"].axes
    uniform = line(ax_steps, "uniform (n=3)")
    np.testing.assert_array_equal(uniform.get_xdata(), EVAL_STEPS)
    np.testing.assert_allclose(uniform.get_ydata(), seed_mean("uniform"))
    assert uniform.get_color() == "#000000"  # uniform is always black
    np.testing.assert_allclose(line(ax_steps, f"{AC} (n=2)").get_ydata(), seed_mean("ac_odm"))
    np.testing.assert_allclose(line(ax_steps, "natural (n=2)").get_ydata(), seed_mean("natural"))
    np.testing.assert_allclose(line(ax_tokens, "uniform (n=3)").get_xdata(), np.array(EVAL_STEPS) * 1000)
    for ax in (ax_steps, ax_zoom, ax_tokens):
        assert list(line(ax, "target 32").get_ydata()) == [32.0, 32.0]
        assert ax.get_ylabel() == "val/mean_ppl (perplexity, lower is better)"
    assert ax_zoom.get_xlim()[0] >= 40 / 2 * 0.97 - 1e-9  # the zoom shows the second half only
    assert ax_tokens.get_xlabel() == "tokens trained"


def test_domain_curves_have_one_panel_per_domain(groups, figures, tmp_path):
    plot_domain_curves(groups, tmp_path / "domains.png")
    axes = [ax for ax in figures["domains.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["a", "b", "junk (not a target)"]
    a, b, junk = axes
    np.testing.assert_allclose(line(a, "uniform (n=3)").get_ydata(), seed_mean("uniform", lambda m: m - HALF_GAP))
    np.testing.assert_allclose(line(b, "uniform (n=3)").get_ydata(), seed_mean("uniform", lambda m: m + HALF_GAP))
    np.testing.assert_allclose(line(junk, f"{AC} (n=2)").get_ydata(), seed_mean("ac_odm", lambda m: 3 * m))
    assert a.title.get_color() != b.title.get_color()  # each domain in its own colour


def test_final_bars_show_final_values_and_the_change_against_uniform(groups, figures, tmp_path):
    plot_final_domain_bars(groups, tmp_path / "bars.png")
    top, relative = figures["bars.png"].axes[:2]
    bars = {c.get_label(): [r.get_height() for r in c] for c in top.containers if isinstance(c, BarContainer)}
    final = {kind: np.mean([curve[-1] for _, curve, _ in seeds]) for kind, seeds in CURVES.items()}
    # columns: a, b, junk, val/mean_ppl
    np.testing.assert_allclose(
        bars["uniform (n=3)"], [final["uniform"] - HALF_GAP, final["uniform"] + HALF_GAP, 3 * final["uniform"],
                                final["uniform"]]
    )
    assert bars[f"{AC} (n=2)"][3] == pytest.approx(final["ac_odm"])
    changes = {c.get_label(): [r.get_height() for r in c] for c in relative.containers if isinstance(c, BarContainer)}
    assert "uniform (n=3)" not in changes  # the baseline is the zero line
    assert changes[f"{AC} (n=2)"][3] == pytest.approx((final["ac_odm"] / final["uniform"] - 1) * 100)
    assert [t.get_text() for t in relative.get_xticklabels()] == [
        "a", "b", "junk\n(not a target)", "val/mean_ppl\n(mean over targets)"]


def test_agent_plot_draws_each_signal_for_the_methods_that_record_it(groups, figures, tmp_path):
    plot_agent_training(groups, tmp_path / "agent.png")
    reward, critic, actor = figures["agent.png"].axes[:3]
    assert {ln.get_label() for ln in reward.get_lines()} >= {"uniform (n=3)", "natural (n=2)", f"{AC} (n=2)"}
    assert [ln.get_label() for ln in critic.get_lines() if not ln.get_label().startswith("_")] == [f"{AC} (n=2)"]
    (warmup,) = [ln for ln in critic.get_lines() if ln.get_linestyle() == ":"]
    assert list(warmup.get_xdata()) == [5.0, 5.0]  # the end of the synthetic AC-ODM warmup
    # the actor loss is -step/40 from step 5: its seed mean, smoothed, still rises from about -0.1 to -1
    y = line(actor, f"{AC} (n=2)").get_ydata()
    assert y[0] > y[-1] and y[-1] == pytest.approx(-1.0, abs=0.05)


def test_mixture_weights_stack_in_domain_order(groups, figures, tmp_path):
    plot_mixture_weights(groups["natural"], tmp_path / "natural.png")
    (ax,) = figures["natural.png"].axes
    assert ax.get_title() == "all 2 seeds (identical weights)"
    layers = [c for c in ax.collections if isinstance(c, PolyCollection)]
    tops = [c.get_paths()[0].vertices[:, 1].max() for c in layers]
    np.testing.assert_allclose(tops, [0.5, 0.8, 1.0])  # natural weights a 0.5, b 0.3, junk 0.2, stacked
    colors = domain_colors(["a", "b", "junk"])
    for layer, domain in zip(layers, ["a", "b", "junk"], strict=True):
        np.testing.assert_allclose(layer.get_facecolor()[0], colors[domain])
    legend = figures["natural.png"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["junk", "b", "a"]  # top layer first

    plot_mixture_weights(groups[AC], tmp_path / "ac.png")
    axes = figures["ac.png"].axes
    assert len(axes) == 2  # the seeds mixed differently: one panel each
    for ax in axes:
        (warmup,) = [ln for ln in ax.get_lines() if ln.get_label() == "end of agent warmup"]
        assert list(warmup.get_xdata()) == [5.0, 5.0]
        top = [c for c in ax.collections if isinstance(c, PolyCollection)][-1]
        np.testing.assert_allclose(top.get_paths()[0].vertices[:, 1].max(), 1.0)


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


def test_sweep_plot_numeric_and_categorical_parameters(figures, tmp_path):
    results = pd.DataFrame({
        "agent.actor_lr": [1e-5, 1e-4, 1e-3, 1e-2],
        "agent.exploration.kind": ["dirichlet", "logit_gaussian", "dirichlet", "logit_gaussian"],
        "agent.gamma": [0.9, 0.9, 0.9, 0.9],  # not swept: left out by default
        "val/mean_ppl": [40.0, 35.0, 33.0, 38.0],
    })
    path = plot_sweep(results, tmp_path / "sweep.png")
    fig = figures["sweep.png"]
    assert_png_of(path, fig)
    lr, kind = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == ["agent.actor_lr", "agent.exploration.kind"]  # gamma: not swept
    assert lr.get_xscale() == "log"  # 1e-5 .. 1e-2
    trials, best = lr.collections
    np.testing.assert_allclose(trials.get_offsets(), results[["agent.actor_lr", "val/mean_ppl"]].to_numpy())
    np.testing.assert_allclose(best.get_offsets(), [[1e-3, 33.0]])  # the lowest val/mean_ppl
    assert [t.get_text() for t in kind.get_xticklabels()] == ["dirichlet", "logit_gaussian"]
    np.testing.assert_allclose(kind.collections[0].get_offsets()[:, 0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="no 'val/loss' column"):
        plot_sweep(results, tmp_path / "x.png", metric="val/loss")
    with pytest.raises(ValueError, match="not varying columns"):
        plot_sweep(results, tmp_path / "x.png", params=["nope"])


def test_warmup_end_is_the_first_step_after_warmup(groups):
    assert warmup_end(groups["AC-ODM (online)"][0]) == 5.0
    assert warmup_end(groups["uniform"][0]) is None
