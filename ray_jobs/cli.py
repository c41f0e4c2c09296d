"""The ``acodm`` command line: data, train, tune, proxy, report, export.

Each subcommand validates its config first (so a bad field fails before any work starts) and then
hands over to the module that owns the work; imports are lazy so ``acodm --help`` stays fast.
User errors (bad config, missing files, unreachable cluster) print one clear message and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ray_jobs.config import ConfigError, ExperimentConfig, load_config

log = logging.getLogger("acodm")

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    ConnectionError,
    TimeoutError,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config field, e.g. --set agent.gamma=0.9 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand, with help for each."""
    parser = argparse.ArgumentParser(
        prog="acodm",
        description="Actor-Critic Online Data Mixing for LLM pretraining on Ray Train, Ray Tune and MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build the demo corpus or prepare token shards")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    demo = data_sub.add_parser("demo", help="assemble the offline demo corpus (jsonl per domain) into OUT_DIR")
    demo.add_argument("out_dir", type=Path)
    prep = data_sub.add_parser("prepare", help="tokenize the config's domains into shards + manifest.json")
    _add_config_args(prep)
    prep.add_argument("--ray", action="store_true", help="tokenize with Ray Data (uses ray.address)")
    prep.add_argument(
        "--force", action="store_true",
        help="replace a prepared corpus with other domains or another tokenizer (runs trained on it break)",
    )
    verify = data_sub.add_parser(
        "verify", help="check a prepared directory fully: manifest, sizes, every shard's sha256, the tokenizer"
    )
    verify.add_argument("prepared_dir", type=Path, metavar="DIR")

    train = sub.add_parser("train", help="run one pretraining run with the configured mixer")
    _add_config_args(train)
    train.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="resume this run directory")

    tune = sub.add_parser("tune", help="Ray Tune sweep over the config's tune.param_space")
    _add_config_args(tune)
    tune.add_argument("--resume", type=Path, default=None, metavar="EXP_DIR", help="continue this sweep")

    proxy = sub.add_parser("proxy", help="train the agent on a small LM, then steer the target LM with it frozen")
    _add_config_args(proxy)

    report = sub.add_parser("report", help="compare runs: report.md, report.html and PNG plots")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, required=True, help="output directory")
    report.add_argument("--target", type=float, default=None, help="val/mean_ppl target (default: uniform's best)")

    export = sub.add_parser("export", help="export a run's model and tokenizer in Hugging Face format")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR")
    return parser


def command(name: str) -> str:
    """How to type console script ``name`` so that a printed hint runs as printed: the absolute path in this
    interpreter's virtual environment (which need not be activated) when it has the script there, else
    the bare name."""
    if sys.prefix != sys.base_prefix:
        path = Path(sys.prefix) / "bin" / name
        if path.is_file():
            return str(path)
    return name


def _run_page(run_dir: Path) -> str | None:
    """The MLflow UI path of the run recorded in ``<run_dir>/mlflow_run.json``, on the model-training view."""
    import json

    try:
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None
    return f"/#/runs/{run_id}?workflowType=machine_learning"


def print_run_summary(cfg: ExperimentConfig, result: dict) -> None:
    """Tell the user where the run, its ledger and its MLflow record are (stdout)."""
    from ray_jobs.tracking import resolve_tracking_uri

    run_dir = Path(result["run_dir"])
    ev = result.get("eval") or result.get("metrics") or {}
    lines = [f"run directory : {run_dir}", f"ledger        : {run_dir / 'ledger.parquet'}"]
    if "val/mean_ppl" in ev:
        lines.append(f"val/mean_ppl  : {ev['val/mean_ppl']:.4f}")
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir)
        if uri.startswith("sqlite:"):
            lines.append(f"MLflow        : {command('mlflow')} ui --backend-store-uri {uri} --host 127.0.0.1")
            page = _run_page(run_dir)
            if page:  # the model-training view (MLflow 3's UI opens on its GenAI view otherwise)
                lines.append(f"  then open  : http://127.0.0.1:5000{page}")
        else:
            lines.append(f"MLflow        : {uri} (experiment {cfg.tracking.experiment_name!r})")
    lines.append(f"report        : {command('acodm')} report {run_dir} --out {run_dir / 'report'}")
    print("\n".join(lines))


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def _prepare(cfg: ExperimentConfig, *, use_ray: bool, force: bool) -> int:
    """``acodm data prepare``; a refusal to replace another corpus names the runs that used it."""
    from envs.prepare import CorpusReplaceError, prepare_corpus

    try:
        if use_ray or cfg.ray.address:
            from ray_jobs.data import prepare_with_ray

            prepare_with_ray(cfg, force=force)
        else:
            prepare_corpus(cfg.data, seq_len=cfg.lm.seq_len, seed=cfg.seed, force=force)
    except CorpusReplaceError as exc:
        from ray_jobs.rundir import describe_users

        raise FileExistsError(f"{exc}.{describe_users(exc.out_dir, cfg.output_dir)}") from None
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line; returns the exit code."""
    if args.command == "data" and args.data_command == "demo":
        from envs.corpus import build_demo_corpus

        build_demo_corpus(args.out_dir)
        return 0
    if args.command == "data" and args.data_command == "prepare":
        return _prepare(_load(args), use_ray=args.ray, force=args.force)
    if args.command == "data" and args.data_command == "verify":
        from envs.integrity import verify_prepared_dir

        print(f"{args.prepared_dir}: OK, {verify_prepared_dir(args.prepared_dir).summary()}")
        return 0
    if args.command == "train":
        cfg = _load(args)
        if cfg.ray.enabled:
            from ray_jobs.train import run_train

            result = run_train(cfg, resume=args.resume)
        else:
            from ray_jobs.driver import run_local

            result = run_local(cfg, resume=args.resume)
        print_run_summary(cfg, result)
        return 0
    if args.command == "tune":
        cfg = _load(args)
        from ray_jobs.tune import run_tune

        run_tune(cfg, resume=args.resume)
        return 0
    if args.command == "proxy":
        cfg = _load(args)
        from ray_jobs.proxy import run_proxy

        run_proxy(cfg)
        return 0
    if args.command == "report":
        from analysis.report import SUMMARY_FILE, build_report

        html_path = build_report(args.run_dirs, args.out, target=args.target)
        print((html_path.parent / SUMMARY_FILE).read_text(), end="")
        print(f"report: {html_path} (and report.md, plots/)")
        return 0
    if args.command == "export":
        from envs.export import export_hf

        export_hf(args.run_dir, args.hf)
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a known command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``acodm`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"acodm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("acodm: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``acodm`` console script: ``main`` in a process that has the allocator settings.

    glibc reads its malloc settings (``ray_jobs.allocator.ALLOCATOR_ENV``) from the environment when a
    process starts, so when one is missing the command runs again in place (``os.execv``) with them
    set; values the user set are kept. Ray's workers get the same settings through the job's runtime
    environment.
    """
    from ray_jobs.allocator import allocator_env

    wanted = allocator_env()
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        os.environ.update(wanted)
        os.execv(sys.executable, [sys.executable, "-m", "ray_jobs", *sys.argv[1:]])
    return main()


if __name__ == "__main__":
    sys.exit(main())
