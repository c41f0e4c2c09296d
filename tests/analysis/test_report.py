"""`acodm report`: report.md + self-contained report.html with the hand-computed table and every plot."""

from __future__ import annotations

import re

import pytest

from analysis.report import build_report, log_report_to_mlflow
from ray_jobs.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _all(run_dirs):
    return [d for dirs in run_dirs.values() for d in dirs]


def _row(markdown, method):
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture
def no_plots(monkeypatch):
    """Skip rendering for tests about tables and errors (one test renders everything, once)."""
    monkeypatch.setattr("analysis.report.render_plots", lambda comparison, plot_dir: [])


def test_report_holds_the_hand_computed_table_and_every_plot(rendered_report):
    _, out = rendered_report
    html_path = out / "report.html"
    md = (out / "report.md").read_text()
    # uniform: final 31 +- 2.48; steps mean(38, 40, 30 + 100/11) = 39.03; the baseline
    assert _row(md, "uniform") == ["uniform", "3", "31 \u00b1 2.5", "30.41 \u00b1 2.5", "39.03 \u00b1 2.5",
                                   "1\u00d7 (by construction)", "39k", "0.6 \u00b1 0.25", "40k", "baseline"]
    # AC-ODM: final 25.5 +- 6.35; steps mean(20 + 20/3, 25) = 25.83; ratio 0.662; real differences
    ac = _row(md, "AC-ODM (online)")
    assert ac[:3] == ["AC-ODM (online)", "2", "25.5 \u00b1 6.4"]
    assert ac[4:7] == ["25.83 \u00b1 11", "0.662\u00d7", "25.8k"]
    assert ac[-1] == "neither"
    assert _row(md, "natural")[-1] == "ppl + steps"  # within uniform's seed spread on both
    assert "target val/mean_ppl = 32" in md and "linearly interpolated" in md
    # per-domain table marks the junk domain
    assert "junk (not a target)" in md
    # plots: referenced from the markdown, present, non-empty PNGs, embedded in the HTML
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    # ppl curves, per-domain curves, final bars, training dynamics, train loss per domain, agent signals
    assert len(linked) == 6 + 3  # + 3 weight plots
    for rel in linked:
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, rel
    html = html_path.read_text()
    assert html.count("src='data:image/png;base64,") == len(linked)
    assert "src='plots/" not in html  # self-contained
    assert "<td>AC-ODM (online)</td>" in html
    # configs compared: the differing key agent.kind, not the per-seed keys
    assert "| agent.kind |" in md.replace("| seed | agent.kind |", "| agent.kind |")
    assert not list(out.rglob(".*tmp*"))


def test_report_with_a_target_and_no_uniform_run(run_dirs, tmp_path, no_plots):
    build_report(run_dirs["ac_odm"], tmp_path / "none")
    md = (tmp_path / "none" / "report.md").read_text()
    assert "No target: no uniform run" in md
    assert _row(md, "AC-ODM (online)")[4] == "\u2014 (no target)"
    build_report(run_dirs["ac_odm"], tmp_path / "r", target=30.0)
    row = _row((tmp_path / "r" / "report.md").read_text(), "AC-ODM (online)")
    assert row[5] == "\u2014" and row[-1] == "n/a"  # no ratio, no noise flag without uniform


def test_report_labels_override_methods(run_dirs, tmp_path, no_plots):
    labels = {str(d): "best static (oracle)" for d in run_dirs["natural"]}
    build_report(_all(run_dirs), tmp_path / "r", labels=labels)
    assert "| best static (oracle) | 2 |" in (tmp_path / "r" / "report.md").read_text()


def test_cli_report_success_and_clear_error(run_dirs, tmp_path, capsys, no_plots):
    dirs = [str(d) for d in _all(run_dirs)]
    assert main(["report", *dirs, "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err


def test_report_of_a_single_run_works_as_the_train_hint_prints_it(run_dirs, tmp_path, capsys):
    """``acodm train`` ends with ``acodm report runs/X --out runs/X/report``: one run, no uniform, no target."""
    run_dir = run_dirs["ac_odm"][0]
    assert main(["report", str(run_dir), "--out", str(run_dir / "report")]) == 0, capsys.readouterr().err
    md = (run_dir / "report" / "report.md").read_text()
    assert md.count("| AC-ODM (online) | 1 |") == 1
    assert "1 run, 1 method" in md and "(n=1)" in md and "95% CI" not in md
    assert (run_dir / "report" / "plots" / "val_mean_ppl.png").is_file()
    out = capsys.readouterr().out
    assert "| AC-ODM (online) | 1 |" in out and "Verdict: one method only" in out


def test_cli_report_prints_the_table_and_an_honest_verdict(run_dirs, tmp_path, capsys, no_plots):
    dirs = [str(d) for d in _all(run_dirs)]
    assert main(["report", *dirs, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| uniform | 3 |" in out
    # AC-ODM: 25.5 vs 31 = 17.7% lower, ratio 0.66, outside uniform's sd of 1.0
    assert "Verdict: AC-ODM (online) ends at val/mean_ppl 25.5 against uniform's 31 (17.7% lower)" in out
    assert "0.66\u00d7 uniform's steps" in out and "beyond uniform's seed-to-seed spread" in out
    one_seed = [str(run_dirs["uniform"][0]), str(run_dirs["natural"][0])]
    assert main(["report", *one_seed, "--out", str(tmp_path / "n1")]) == 0
    assert "n=1" in capsys.readouterr().out


@pytest.mark.slow
def test_log_report_to_mlflow(rendered_report, tmp_path):
    from mlflow.tracking import MlflowClient

    with pytest.raises(FileNotFoundError, match="run build_report first"):
        log_report_to_mlflow(tmp_path / "empty", "x", "sqlite:///unused.db")
    _, out = rendered_report
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("r", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    log_report_to_mlflow(out, run_id, uri)
    names = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/plots"} <= names
    assert len(client.list_artifacts(run_id, "report/plots")) == 9


def test_tokens_and_epochs_per_domain_warn_about_repeated_domains(run_dirs, tmp_path):
    import json

    from analysis.metrics import compare
    from analysis.report import MAX_EPOCHS, data_table
    from analysis.runs import load_run

    runs = [load_run(d) for d in run_dirs["uniform"]]
    _, warnings = data_table(compare(runs))
    assert any("No epochs" in w for w in warnings)  # the fixture runs have no prepared corpus
    tokens_a = runs[0].ledger["tokens/a"].sum()
    # a corpus in which domain a is small enough to be trained on more than MAX_EPOCHS times, b is not
    sizes = {"a": int(tokens_a / (MAX_EPOCHS + 1)), "b": 10**9, "junk": 10**9}
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "manifest.json").write_text(json.dumps(
        {"domains": [{"name": d, "splits": {"train": {"num_tokens": n}}} for d, n in sizes.items()]}))
    for run in runs:
        run.config["data"]["prepared_dir"] = str(tmp_path / "prep")
    (header, rows), warnings = data_table(compare(runs))
    assert header == ["method", "a", "b", "junk"] and rows[0][2].endswith(" ep)")
    assert len(warnings) == 1 and "epochs of a (more than 4)" in warnings[0]
