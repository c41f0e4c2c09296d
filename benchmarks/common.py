"""Shared helpers of ``sample_efficiency.py``, ``overhead.py`` and ``gpu.py``.

* machine facts recorded next to every number (CPU, cores, memory, GPU, load average, git revision);
* the allocator settings of a training process (``ray_jobs.allocator.ALLOCATOR_ENV``): a script that
  runs step loops itself re-executes itself with them (``run_with_allocator_env``), as the ``acodm``
  console script does, and starts its local Ray with them in the job's runtime environment
  (``ray_init``), as ``acodm train`` does;
* timing summaries (min / median / max) and process memory (resident set, its peak, and resetting
  the peak through ``/proc/self/clear_refs`` so one process can measure several variants in turn);
* ``StepLoop``: one optimiser step of a run the way the run loop takes it, in the variants that the
  overhead and GPU benchmarks compare (static mixture without the probe, with the probe ``exact`` or
  ``sketch``; AC-ODM: the probe plus the agent as ``acodm train`` runs it under Ray, a ``Learner``
  actor that observes and updates, and rank 0 acting from its own copy, ``ActingMixer``);
* a synthetic prepared corpus of random tokens (no download, any vocabulary and domain count);
* Markdown tables and an atomic append of a section to ``benchmarks/RESULTS.md``.

Nothing here changes library behaviour: the variants are built from the public ``envs``, ``agents``
and ``ray_jobs`` pieces exactly as ``ray_jobs.driver`` and ``ray_jobs.train`` wire them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "benchmarks" / "RESULTS.md"
if str(REPO_ROOT) not in sys.path:  # the scripts run as files; the packages live at the repo root
    sys.path.insert(0, str(REPO_ROOT))

# Variants of one loop iteration, in the order they are reported (the first is the baseline).
VARIANTS = ("static", "exact", "sketch", "ac_odm")
VARIANT_LABELS = {
    "static": "static mixture, no probe",
    "exact": "static mixture + probe (exact)",
    "sketch": "static mixture + probe (sketch)",
    "ac_odm": "AC-ODM: probe (exact) + learner actor, acting on rank 0",
    "ac_odm_sketch": "AC-ODM: probe (sketch) + learner actor, acting on rank 0",
}


# --------------------------------------------------------------------------------------------- machine facts
def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaNs where the platform has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def format_load(load: Sequence[float] | None = None) -> str:
    """``load 3.1 / 4.2 / 5.0 (1/5/15 min)``."""
    one, five, fifteen = load if load is not None else load_average()
    return f"load {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) / 2**20 if match else float("nan")
    except OSError:
        return float("nan")


def machine_summary() -> str:
    """One line: CPU model and cores, memory, OS, Python, torch, GPU (or none)."""
    import torch

    gpu = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return (
        f"{os.cpu_count()} cores {_cpu_model()}, {_memory_gib():.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, {gpu}"
    )


def git_revision() -> str:
    """Short hash of HEAD, with ``+ uncommitted changes`` when the tree is dirty; ``unknown`` without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def command_line() -> str:
    """The command that is running, as a user would retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join([".venv/bin/python", shlex.quote(script_text), *map(shlex.quote, sys.argv[1:])])


def utc_now() -> str:
    """``2026-12-01 14:05 UTC``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------ allocator and local Ray
def run_with_allocator_env(argv: Sequence[str] | None = None) -> None:
    """Make sure this process has the allocator settings of a training process; re-execute it if not.

    glibc reads its malloc settings (``ray_jobs.allocator.ALLOCATOR_ENV``) from the environment when a
    process starts, so a script that runs step loops itself calls this first: when a setting is missing
    the script runs again in place (``os.execv``, as ``ray_jobs.cli.console_main`` does) with them set;
    values already in the environment are kept. Child processes inherit them.

    Args:
        argv: the script's arguments (default ``sys.argv[1:]``).
    """
    from ray_jobs.allocator import allocator_env

    wanted = allocator_env()
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    os.environ.update(wanted)
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(sys.executable, [sys.executable, str(Path(sys.argv[0]).resolve()), *args])


def allocator_summary() -> str:
    """``MALLOC_MMAP_THRESHOLD_=... ...``: the allocator settings this process runs with."""
    from ray_jobs.allocator import ALLOCATOR_ENV

    return " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ALLOCATOR_ENV)


def ray_init(
    num_cpus: int | None = None, *, include_dashboard: bool = False, log_to_driver: bool = False
) -> None:
    """A new local Ray, started as ``ray_jobs.cluster.connect`` starts one for ``acodm train`` (workers
    at the driver's niceness, the allocator settings in the job's runtime environment); by default
    without the dashboard and the workers' log lines (not part of what is measured).

    ``address="local"`` always starts a Ray of this process's own: without it ``ray.init`` joins any
    Ray already running on the machine (another user's: Ray records the newest local instance's address).
    ``connect`` reuses a Ray initialised here.
    """
    import ray

    from ray_jobs.cluster import job_runtime_env, local_num_cpus, local_system_config

    ray.init(
        address="local",
        num_cpus=num_cpus or local_num_cpus(),
        include_dashboard=include_dashboard,
        log_to_driver=log_to_driver,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
        _system_config=local_system_config() or None,
        runtime_env=job_runtime_env(None),
    )


# ------------------------------------------------------------------------------------- timing and memory
@dataclass(frozen=True)
class TimeSummary:
    """Seconds per repetition: min, median, max over ``n`` repetitions."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, times_s: Sequence[float]) -> TimeSummary:
        """Summarise a non-empty list of durations."""
        if not times_s:
            raise ValueError("TimeSummary.of needs at least one duration")
        return cls(min(times_s), statistics.median(times_s), max(times_s), len(times_s))


def _proc_status_kib(key: str, pid: int | str = "self") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/{pid}/status has no {key} line")
    return int(match.group(1))


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process now (Linux ``VmRSS``)."""
    return _proc_status_kib("VmRSS", pid) * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (Linux ``VmHWM``; ``ru_maxrss`` where /proc is absent, this process only)."""
    try:
        return _proc_status_kib("VmHWM", pid) * 1024
    except OSError:
        if pid != "self":
            raise
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fmt_bytes(n: float) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``640 B``."""
    if not np.isfinite(n):
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------- tables and RESULTS.md
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are ``str()``-ed and ``|`` is escaped."""

    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_section(text: str, path: str | os.PathLike[str] = RESULTS_FILE) -> Path:
    """Append ``text`` (a Markdown section) to ``path``, atomically: write a temp file, then rename.

    The file is read and rewritten whole, so other sections are kept byte for byte; a file that does
    not exist yet is created with a title.
    """
    p = Path(path)
    old = p.read_text(encoding="utf-8") if p.exists() else "# Benchmark results\n"
    new = old.rstrip("\n") + "\n\n" + text.strip("\n") + "\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, p)
    return p


# -------------------------------------------------------------------------------------- synthetic corpus
def synthetic_corpus(
    out_dir: str | os.PathLike[str],
    *,
    num_domains: int,
    vocab_size: int,
    train_tokens: int,
    val_tokens: int,
    seed: int = 0,
) -> list[str]:
    """Write a prepared corpus of uniformly random tokens (ids 1..vocab-1) and return its domain names.

    Throughput and overhead do not depend on the text, so random tokens stand in for a real corpus. The
    files have the real format (manifest, ``tokenizer.json``, token shards), written by the same helper the
    tests use, and are read through ``envs.data.PreparedCorpus`` memory maps like a prepared corpus.
    """
    from tests.envs.lm_fixtures import word_level_tokenizer, write_prepared_corpus

    rng = np.random.default_rng(seed)
    names = [f"d{k:02d}" for k in range(num_domains)]
    streams = {
        n: {
            "train": rng.integers(1, vocab_size, size=train_tokens),
            "val": rng.integers(1, vocab_size, size=val_tokens),
        }
        for n in names
    }
    write_prepared_corpus(Path(out_dir), streams, word_level_tokenizer(vocab_size))
    return names


def synthetic_experiment(
    prepared_dir: str | os.PathLike[str], domain_names: Sequence[str], overrides: Mapping[str, Any]
) -> Any:
    """An ``ExperimentConfig`` over a synthetic corpus (sources are never read: the corpus is prepared)."""
    from ray_jobs.config import ExperimentConfig, set_dotted

    data: dict[str, Any] = {
        "name": "bench",
        "data": {
            "prepared_dir": str(prepared_dir),
            "domains": [{"name": n, "source": {"paths": [f"synthetic/{n}.jsonl"]}} for n in domain_names],
        },
        "ray": {"enabled": False},
        "tracking": {"enabled": False},
    }
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return ExperimentConfig.from_dict(data, source="synthetic benchmark config")


# --------------------------------------------------------------------------------------------- step loops
class StepLoop:
    """One loop iteration (decide, train one optimiser step, observe) in one of the ``VARIANT_LABELS``.

    * ``static``: the ``Pretrainer`` alone with the probe detached (no hooks, no observation or reward
      maths): what a fixed-mixture run without AC-ODM's machinery costs;
    * ``exact`` / ``sketch``: ``DataMixingEnv.step`` with the probe in that mode (hooks, per-domain sums,
      Gram matrix, observation and reward), weights from a local static mixer;
    * ``ac_odm`` / ``ac_odm_sketch``: the same env step, weights from AC-ODM as ``ray_jobs.train`` wires
      it under Ray (``_make_mixer``): an ``ActingMixer`` in this process whose ``act`` is a forward pass
      of its local copy (loading the newest policy the ``Learner`` actor has published, never waiting)
      and whose ``observe`` submits the transition to the learner without waiting; the learner observes
      and updates in its own process.

    The agent calls are timed as ``ray_jobs.driver.RunLoop.run`` times them (``time/agent_s``: ``act``,
    then building the ``Transition``, ``observe`` and ``update``). Ray must be initialised for the
    AC-ODM variants (``ray_init``).

    Args:
        name: one of ``VARIANT_LABELS``.
        cfg: the ``ExperimentConfig`` (``env.probe.mode`` and ``agent`` are set here per variant).
        device: the LM's device (None: CUDA when available).
        agent_overrides: ``AgentConfig`` fields for the AC-ODM variants on top of ``cfg.agent`` (e.g.
            network sizes, warmup 0).
        agent_cpus: CPUs reserved for the learner actor (``ray.agent_resources``).
    """

    def __init__(
        self,
        name: str,
        cfg: Any,
        *,
        device: Any = None,
        agent_overrides: Mapping[str, Any] | None = None,
        agent_cpus: float = 0.0,
    ) -> None:
        from envs.backends import LMBackend
        from envs.env import DataMixingEnv
        from ray_jobs.config import ExperimentConfig

        if name not in VARIANT_LABELS:
            raise ValueError(f"unknown step-loop variant {name!r}; expected one of {sorted(VARIANT_LABELS)}")
        self.name = name
        self.is_agent = name.startswith("ac_odm")
        data = cfg.to_dict()
        data["env"]["probe"]["mode"] = "sketch" if "sketch" in name.split("_") else "exact"
        # keep the base config's agent settings (network sizes, exploration, ...); only the kind changes
        plain = {**data["agent"], "mode": "online", "policy": None, "weights": None}
        data["agent"] = (
            {**plain, "kind": "ac_odm", **(agent_overrides or {})}
            if self.is_agent
            else {**plain, "kind": "uniform"}
        )
        self.cfg = ExperimentConfig.from_dict(data, source=f"step loop {name}")
        self.backend = LMBackend(self.cfg, device=device)
        self.env = DataMixingEnv(self.cfg, backend=self.backend)
        self.obs, _ = self.env.reset(seed=self.cfg.seed)
        self.probe_bytes = int(sum(self.backend.probe.state_bytes().values()))
        if name == "static":
            self.backend.probe.close()  # removes the gradient hooks and frees the sums
            self.backend.pretrainer.set_observer(None)
            self.probe_bytes = 0
        self._agent_cpus = agent_cpus
        self.mixer = self._build_mixer()
        self.act_s: list[float] = []  # wall seconds of each ``act``
        # wall seconds of each step's agent calls on this process (act + observe + update), what
        # ``ray_jobs.driver.RunLoop.run`` records as ``time/agent_s``
        self.agent_s: list[float] = []
        self.wall_s: list[float] = []  # wall seconds of each iteration
        self.cpu_s: list[float] = []  # CPU seconds of this process (all its threads) per iteration
        # AC-ODM: ``agent/policy_lag`` of every learner update taken in (``update()``'s metrics), and the
        # newest metrics
        self.policy_lags: list[float] = []
        self.agent_metrics: dict[str, float] = {}
        # AC-ODM: per step, whether its ``act`` took in a newly published policy (``update()`` then
        # returns that update's metrics)
        self.took_policy: list[bool] = []
        self._cuda = self.backend.pretrainer.device.type == "cuda"

    def learner_spec(self) -> Any:
        """The ``LearnerSpec`` the AC-ODM variants start their learner from (``ray_jobs.train``'s)."""
        from ray_jobs.agent_actor import LearnerSpec
        from ray_jobs.driver import mixer_kwargs

        kwargs = mixer_kwargs(self.cfg, self.env)
        return LearnerSpec(
            agent_cfg=self.cfg.agent,
            observation_space=kwargs.pop("observation_space"),
            action_space=kwargs.pop("action_space"),
            mixer_kwargs=kwargs,
            resources={"CPU": self._agent_cpus},
        )

    def _build_mixer(self) -> Any:
        from ray_jobs.driver import build_local_mixer

        if not self.is_agent:
            return build_local_mixer(self.cfg, self.env)
        from ray_jobs.agent_actor import ActingMixer

        return ActingMixer(self.learner_spec())

    def step(self) -> float:
        """Run one iteration; returns its wall seconds (CUDA work included: the step ends synchronised).

        The wall and CPU seconds are also appended to ``wall_s`` and ``cpu_s``, the agent calls' wall
        seconds to ``act_s`` and ``agent_s``. CPU time is this process's only (the learner's is in
        ``learner_cpu_s``); on a loaded machine it is the steadier measure.
        """
        import torch

        from agents.base import Transition

        if self._cuda:
            torch.cuda.synchronize()
        cpu = time.process_time()
        start = time.perf_counter()
        weights_K = self.mixer.act(self.obs, explore=True)
        t_act = time.perf_counter() - start
        self.act_s.append(t_act)
        if self.name == "static":
            self.backend.pretrainer.train_step(np.asarray(weights_K, dtype=np.float64))
            self.agent_s.append(t_act)
        else:
            next_obs, reward, _, truncated, info = self.env.step(weights_K)
            t_observe = time.perf_counter()
            self.mixer.observe(Transition.from_step(self.obs, weights_K, float(reward), next_obs, info))
            metrics = self.mixer.update()  # static mixer: {}; AC-ODM: the newest learner update taken in
            self.agent_s.append(t_act + time.perf_counter() - t_observe)
            if self.is_agent:
                self.took_policy.append(bool(metrics))
            if metrics:
                self.agent_metrics = dict(metrics)
                if "agent/policy_lag" in metrics:
                    self.policy_lags.append(float(metrics["agent/policy_lag"]))
            self.obs = next_obs
            if truncated:
                raise RuntimeError(
                    f"variant {self.name}: the step budget ({self.cfg.train.total_steps}) ran out; "
                    "raise train.total_steps"
                )
        if self._cuda:
            torch.cuda.synchronize()
        self.wall_s.append(time.perf_counter() - start)
        self.cpu_s.append(time.process_time() - cpu)
        return self.wall_s[-1]

    def clear_times(self) -> None:
        """Forget the per-step records so far (times, policy lags; e.g. after warm-up steps)."""
        for times in (self.act_s, self.agent_s, self.wall_s, self.cpu_s, self.policy_lags, self.took_policy):
            times.clear()

    def wait_for_learner(self) -> None:
        """Wait until the learner has observed and updated on every transition submitted (AC-ODM;
        ``ActingMixer.state_dict``, what a checkpoint waits for); no-op for local mixers."""
        if self.is_agent:
            self.mixer.state_dict()

    def _on_learner(self, call: Any) -> Any:
        import ray

        return ray.get(self.mixer.learner.__ray_call__.remote(call))

    def learner_cpu_s(self) -> float:
        """CPU seconds the learner actor's process has used so far (0 for local mixers)."""
        return float(self._on_learner(lambda _actor: time.process_time())) if self.is_agent else 0.0

    def learner_pid(self) -> int | None:
        """The learner actor's process id (None for local mixers)."""
        return int(self._on_learner(lambda _actor: os.getpid())) if self.is_agent else None

    def agent_summary(self) -> dict[str, float]:
        """AC-ODM: learner updates taken in since ``clear_times`` and their largest policy lag, the
        learner's gradient updates so far (``agent/num_updates`` of the newest one taken in) and its
        restarts; {} for local mixers."""
        if not self.is_agent:
            return {}
        return {
            "taken": float(len(self.policy_lags)),
            "max_policy_lag": max(self.policy_lags, default=float("nan")),
            "num_updates": self.agent_metrics.get("agent/num_updates", float("nan")),
            "restarts": self.agent_metrics.get("agent/restarts", 0.0),
        }

    def close(self) -> None:
        """Stop the learner (if any) and free the model."""
        if self.is_agent:
            self.mixer.close()
        self.env.close()


def interleave(loops: Sequence[StepLoop], *, rounds: int, block: int) -> None:
    """Step every loop ``rounds * block`` times, the loops taking turns in blocks of ``block`` steps.

    The order rotates every round, so drift and other load on the machine hit every variant alike. The
    times land in each loop's ``wall_s`` / ``cpu_s``.
    """
    for r in range(rounds):
        order = list(loops[r % len(loops) :]) + list(loops[: r % len(loops)])
        for loop in order:
            for _ in range(block):
                loop.step()
