"""Shared fixtures and config builders: offline environment, one Ray session per test session (fixed 2
CPUs, 127.0.0.1), one small prepared corpus, and ``experiment`` (a tiny experiment dict with dotted
overrides) for every test that runs the LM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOMAINS = ("alpha", "beta", "gamma")
REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where a CUDA device exists (litgpt's _RunIf idea)."""
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs bound to 127.0.0.1, shared by every ``ray`` test, shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic prepared corpus of ``DOMAINS`` (random tokens; small enough for CPU runs)."""
    from tests.envs.lm_fixtures import make_synthetic_corpus

    out = tmp_path_factory.mktemp("prepared")
    make_synthetic_corpus(out, domain_names=DOMAINS, train_tokens=6000, val_tokens=1200)
    return out


def experiment(prepared: Path, out: Path, **over: object) -> dict:
    """A tiny experiment dict (fast on CPU): 3 domains, tiny model, sqlite tracking off by default."""
    data = {
        "name": "t",
        "output_dir": str(out),
        "seed": 3,
        "data": {
            "prepared_dir": str(prepared),
            "domains": [{"name": n, "source": {"paths": [f"/nonexistent/{n}.jsonl"]}} for n in DOMAINS],
        },
        "lm": {
            "preset": "tiny",
            "seq_len": 32,
            "precision": "fp32",
            "num_threads": 1,
            "num_layers": 2,
            "hidden_size": 64,
            "num_heads": 2,
        },
        "optim": {"lr": 3e-3, "warmup_fraction": 0.1},
        "sampler": {"micro_batch_size": 2, "grad_accum": 3},
        "train": {"total_steps": 12, "log_interval": 2},
        "eval": {"interval": 4, "max_batches": 2, "batch_size": 4},
        "checkpoint": {"interval": 4, "keep_last": 2},
        "agent": {"kind": "uniform"},
        "ray": {"enabled": False},
        "tracking": {"enabled": False},
    }
    for key, value in over.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data
