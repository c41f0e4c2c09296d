"""Metrics against hand-computed numbers (curves from conftest.CURVES; target = worst uniform seed's best)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from analysis.metrics import (
    aggregate_curve,
    compare,
    default_target,
    group_by_method,
    mean_interval,
    per_domain_final,
    steps_to_target,
    t_quantile,
    target_means,
)
from analysis.runs import load_run

T2 = 4.302652729911275  # t_{0.975, 2 dof}, from a t table
T1 = 12.706204736174698  # t_{0.975, 1 dof}

# Hand computation for the default target 32 (= max of uniform seeds' bests 30, 32, 31):
# uniform s0 [100,60,40,30]: crosses between 30 (40) and 40 (30): 30 + (40-32)/(40-30)*10 = 38
# uniform s1 [110,70,45,32]: reaches 32 exactly at step 40 -> 30 + (45-32)/(45-32)*10 = 40
# uniform s2 [105,65,42,31]: 30 + (42-32)/(42-31)*10 = 30 + 100/11
# natural s0 [100,60,40,30.5]: 30 + 8/9.5*10; natural s1 [104,64,41,31.2]: 30 + 9/9.8*10
# AC-ODM s0 [80,40,28,25]: 20 + (40-32)/(40-28)*10 = 20 + 20/3; s1 [90,34,30,26]: 20 + 2/4*10 = 25
U_STEPS = [38.0, 40.0, 30 + 100 / 11]
N_STEPS = [30 + 80 / 9.5, 30 + 90 / 9.8]
A_STEPS = [20 + 20 / 3, 25.0]


def _runs(run_dirs, *kinds):
    return [load_run(d) for k in kinds for d in run_dirs[k]]


def test_steps_to_target_interpolates_between_evaluations():
    steps, values = [10, 20, 30, 40], [100, 60, 40, 30]
    assert steps_to_target(steps, values, 32) == pytest.approx(38.0)
    assert steps_to_target(steps, values, 50) == pytest.approx(25.0)  # halfway between 60 and 40
    assert steps_to_target(steps, values, 40) == pytest.approx(30.0)  # exactly on an evaluation
    assert steps_to_target(steps, values, 500) == 10.0  # first evaluation already there: no extrapolation
    assert steps_to_target(steps, values, 29.9) == math.inf
    # non-monotone: the first crossing counts, not a later one
    assert steps_to_target(steps, [100, 30, 50, 20], 40) == pytest.approx(10 + 60 / 70 * 10)


@pytest.mark.parametrize(
    ("steps", "values", "target", "match"),
    [([10, 20], [1.0], 1.0, "one length"), ([20, 10], [2.0, 1.0], 1.0, "strictly increasing"),
     ([10, 20], [2.0, 1.0], math.nan, "finite"), ([], [], 1.0, "non-empty")],
)
def test_steps_to_target_rejects_bad_input(steps, values, target, match):
    with pytest.raises(ValueError, match=match):
        steps_to_target(steps, values, target)


def test_t_quantile_and_mean_interval_match_t_table():
    assert t_quantile(0.95, 1) == pytest.approx(T1)
    assert t_quantile(0.95, 2) == pytest.approx(T2)
    assert t_quantile(0.95, 30) == pytest.approx(2.0423, abs=1e-4)
    iv = mean_interval([30, 32, 31])
    assert (iv.mean, iv.n) == (31.0, 3)
    assert iv.half_width == pytest.approx(T2 * 1.0 / math.sqrt(3))
    assert iv.lo == pytest.approx(31 - T2 / math.sqrt(3))
    one = mean_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.half_width)
    assert mean_interval([1.0, math.inf]).mean == math.inf
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_target_means_arithmetic_and_geometric():
    arith, geo = target_means({"a": 24.0, "b": 36.0, "junk": 90.0}, ["a", "b"])
    assert arith == pytest.approx(30.0)
    assert geo == pytest.approx(math.sqrt(24 * 36))
    with pytest.raises(ValueError, match="no perplexity for target domains"):
        target_means({"a": 1.0}, ["a", "b"])


def test_default_target_is_the_best_value_every_uniform_seed_reaches(run_dirs):
    uniform = _runs(run_dirs, "uniform")
    assert default_target(uniform) == 32.0


def test_comparison_table_matches_hand_computed_values(run_dirs):
    c = compare(_runs(run_dirs, "ac_odm", "uniform", "natural"))
    assert c.target == 32.0 and c.baseline == "uniform"
    t = c.table.set_index("method")
    assert list(t.index) == ["uniform", "natural", "AC-ODM (online)"]  # uniform first, whatever the input order
    u, n, a = t.loc["uniform"], t.loc["natural"], t.loc["AC-ODM (online)"]
    assert (u["seeds"], n["seeds"], a["seeds"]) == (3, 2, 2)
    # final val/mean_ppl: uniform 30, 32, 31 -> 31 +- t2 * 1 / sqrt(3); AC-ODM 25, 26 -> 25.5 +- t1 * 0.7071 / sqrt(2)
    assert u["final_ppl"] == pytest.approx(31.0)
    assert u["final_ppl_ci"] == pytest.approx(T2 / math.sqrt(3))
    assert a["final_ppl"] == pytest.approx(25.5)
    assert a["final_ppl_ci"] == pytest.approx(T1 * math.sqrt(0.5) / math.sqrt(2))
    # geometric mean over the target domains a = m - 6, b = m + 6 (junk excluded)
    assert u["final_geo_ppl"] == pytest.approx(np.mean([math.sqrt(m * m - 36) for m in (30, 32, 31)]))
    # steps-to-target with interpolation, its interval, and the ratio to uniform
    assert u["steps_to_target"] == pytest.approx(np.mean(U_STEPS))
    assert u["steps_to_target_ci"] == pytest.approx(T2 * statistics.stdev(U_STEPS) / math.sqrt(3))
    assert n["steps_to_target"] == pytest.approx(np.mean(N_STEPS))
    assert a["steps_to_target"] == pytest.approx(np.mean(A_STEPS))
    assert a["steps_to_target_ci"] == pytest.approx(T1 * statistics.stdev(A_STEPS) / math.sqrt(2))
    assert a["step_ratio"] == pytest.approx(np.mean(A_STEPS) / np.mean(U_STEPS))
    assert a["step_ratio"] == pytest.approx(0.6619, abs=1e-4)
    assert u["step_ratio"] == pytest.approx(1.0)
    assert (u["reached"], a["reached"]) == (3, 2)
    # tokens: 1000 per step
    assert a["tokens_to_target"] == pytest.approx(1000 * np.mean(A_STEPS))
    assert u["tokens"] == 40_000
    # step time: medians 0.5, 0.6, 0.7 s -> 0.6 +- t2 * 0.1 / sqrt(3)
    assert u["step_time_s"] == pytest.approx(0.6)
    assert u["step_time_s_ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))


def test_noise_flags_use_uniform_seed_spread(run_dirs):
    c = compare(_runs(run_dirs, "uniform", "natural", "ac_odm"))
    assert c.uniform_ppl_sd == pytest.approx(1.0)  # sd of 30, 32, 31
    assert c.uniform_ratio_sd == pytest.approx(statistics.stdev(U_STEPS) / np.mean(U_STEPS))
    t = c.table.set_index("method")
    # natural: final 30.85 vs 31 (< 1) and ratio 0.994 (|1 - r| < 0.0257): both noise
    assert t.loc["natural", "ppl_noise"] is True and t.loc["natural", "ratio_noise"] is True
    # AC-ODM: 25.5 vs 31 and ratio 0.66: real differences
    assert t.loc["AC-ODM (online)", "ppl_noise"] is False and t.loc["AC-ODM (online)", "ratio_noise"] is False
    assert t.loc["uniform", "ppl_noise"] is None
    assert any("seed-to-seed spread" in note for note in c.notes)


def test_explicit_target_that_uniform_never_reaches(run_dirs):
    c = compare(_runs(run_dirs, "uniform", "ac_odm"), target=26.0)
    t = c.table.set_index("method")
    assert t.loc["uniform", "steps_to_target"] == math.inf and t.loc["uniform", "reached"] == 0
    # AC-ODM s0 [.., 28, 25]: 30 + 2/3*10; s1 [.., 30, 26]: exactly 40
    assert t.loc["AC-ODM (online)", "steps_to_target"] == pytest.approx((30 + 20 / 3 + 40) / 2)
    assert math.isnan(t.loc["AC-ODM (online)", "step_ratio"])
    assert "given with --target" in c.target_rule


def test_no_uniform_and_no_target_gives_no_steps_to_target(run_dirs):
    c = compare(_runs(run_dirs, "ac_odm"))
    assert c.target is None and "No target" in c.target_rule
    assert math.isnan(c.table.loc[0, "steps_to_target"]) and c.table.loc[0, "reached"] == 0
    assert math.isfinite(c.table.loc[0, "final_ppl"])
    c = compare(_runs(run_dirs, "ac_odm"), target=30.0)
    assert math.isnan(c.table.loc[0, "step_ratio"])
    with pytest.raises(ValueError, match="positive finite"):
        compare(_runs(run_dirs, "ac_odm"), target=-1.0)


def test_group_by_method_rejects_duplicate_seeds_and_mixed_domains(run_dirs, tmp_path):
    runs = _runs(run_dirs, "uniform")
    with pytest.raises(ValueError, match="several runs with seed"):
        group_by_method([runs[0], load_run(run_dirs["uniform"][0])])
    other = load_run(run_dirs["natural"][0])
    other.domain_names.append("extra")
    with pytest.raises(ValueError, match="not comparable"):
        group_by_method([runs[0], other])


def test_aggregate_curve_mean_and_interval_per_step(run_dirs):
    curve = aggregate_curve(_runs(run_dirs, "uniform"), "val/mean_ppl")
    assert curve["step"].tolist() == [10, 20, 30, 40]
    assert curve["mean"].tolist() == pytest.approx([105, 65, 42 + 1 / 3, 31])
    assert curve["hi"].iloc[0] - curve["mean"].iloc[0] == pytest.approx(T2 * 5 / math.sqrt(3))
    assert curve["tokens"].tolist() == [10_000, 20_000, 30_000, 40_000]
    assert aggregate_curve(_runs(run_dirs, "uniform"), "agent/critic_loss").empty


def test_per_domain_final_excludes_nothing_and_keeps_domain_order(run_dirs):
    c = compare(_runs(run_dirs, "uniform", "ac_odm"))
    means, halves = per_domain_final(c.groups)
    assert list(means.columns) == ["a", "b", "junk"]
    assert means.loc["uniform", "a"] == pytest.approx(31 - 6)
    assert means.loc["AC-ODM (online)", "junk"] == pytest.approx(3 * 25.5)
    assert halves.loc["uniform", "b"] == pytest.approx(T2 / math.sqrt(3))


def test_runs_ending_at_different_steps_are_flagged(run_dirs):
    runs = _runs(run_dirs, "uniform", "ac_odm")
    short = runs[-1]
    object.__setattr__(short, "ledger", short.ledger.iloc[:30])  # as if the run stopped at step 30
    c = compare(runs)
    assert any("do not all end at the same step" in n and "30" in n for n in c.notes)
    # its final value is its last evaluation (step 30: 30), not a missing one
    assert c.table.set_index("method").loc["AC-ODM (online)", "final_ppl"] == pytest.approx((25 + 30) / 2)
