"""Analysis of runs: load run directories or MLflow runs, compare methods, plot, and write reports.

Modules (imported explicitly, so ``import analysis`` stays light): ``analysis.runs`` (``load_run``,
``load_mlflow_runs``, ``Run``), ``analysis.metrics`` (``compare``, ``steps_to_target``,
``mean_interval``), ``analysis.plots`` (PNG plots) and ``analysis.report`` (``build_report``,
``log_report_to_mlflow``). Never imports Ray.
"""
