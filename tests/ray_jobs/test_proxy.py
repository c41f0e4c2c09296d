"""``acodm proxy``: the policy learned beside a small LM steers the target LM frozen."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from ray_jobs.checkpoints import latest_checkpoint
from ray_jobs.config import ExperimentConfig
from ray_jobs.proxy import proxy_and_target, run_proxy
from tests.conftest import experiment
from tests.envs.lm_fixtures import make_synthetic_corpus


def pipeline(prepared: Path, out: Path, **over: object) -> ExperimentConfig:
    base = {
        "agent.kind": "ac_odm", "agent.hidden_width": 32, "agent.num_hidden_layers": 2,
        "agent.batch_size": 4, "agent.warmup_fraction": 0.25,
        "proxy.lm": {"preset": "tiny", "seq_len": 32, "precision": "fp32", "num_threads": 1,
                     "num_layers": 2, "hidden_size": 32, "num_heads": 2},
        "tracking.enabled": True,
    }
    return ExperimentConfig.from_dict(experiment(prepared, out, **{**base, **over}))


@pytest.mark.slow
def test_target_run_is_steered_by_the_frozen_proxy_policy(prepared: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = pipeline(prepared, tmp_path)
    result = run_proxy(cfg)
    policy = torch.load(result["policy"], weights_only=True)
    target_dir = Path(result["target"]["run_dir"])
    agent_state = torch.load(latest_checkpoint(target_dir) / "agent.pt", weights_only=True)
    # the target's actor is exactly the proxy's policy: it was never updated
    for name, tensor in policy["actor"].items():
        assert torch.equal(agent_state["actor"][name], tensor), name
    target = pd.read_parquet(target_dir / "ledger.parquet")
    assert "agent/critic_loss" not in target or target["agent/critic_loss"].isna().all()
    proxy = pd.read_parquet(Path(result["proxy"]["run_dir"]) / "ledger.parquet")
    assert proxy["agent/critic_loss"].notna().any(), "the proxy run should train the agent"
    # MLflow: one parent, two children tagged proxy and target, policy on the parent
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("acodm")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_id == result["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["acodm.role"] for r in children) == ["proxy", "target"]
    assert "policy.pt" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_proxy_needs_matching_observation_sizes(prepared: Path, tmp_path: Path) -> None:
    cfg = pipeline(prepared, tmp_path, **{"proxy.lm": {"preset": "tiny", "num_layers": 1, "seq_len": 32}})
    with pytest.raises(ValueError, match="monitors 1 layers"):
        proxy_and_target(cfg)


def test_proxy_needs_ac_odm(prepared: Path, tmp_path: Path) -> None:
    cfg = pipeline(prepared, tmp_path, **{"agent.kind": "uniform"})
    with pytest.raises(ValueError, match="ac_odm"):
        proxy_and_target(cfg)


def test_frozen_policy_for_another_domain_count_is_rejected(prepared: Path, tmp_path: Path) -> None:
    from ray_jobs.driver import run_local

    cfg = pipeline(prepared, tmp_path)
    proxy_cfg, _ = proxy_and_target(cfg)
    run_local(proxy_cfg.model_copy(update={"train": proxy_cfg.train.model_copy(update={"total_steps": 4})}))
    other = tmp_path / "prepared2"
    make_synthetic_corpus(other, domain_names=("alpha", "beta"), train_tokens=4000, val_tokens=800)
    data = experiment(other, tmp_path / "other", **{"agent.kind": "ac_odm", "agent.mode": "frozen",
                      "agent.hidden_width": 32, "agent.num_hidden_layers": 2,
                      "agent.policy": str(tmp_path / "t-proxy" / "policy.pt")})
    data["data"]["domains"] = data["data"]["domains"][:2]
    with pytest.raises(ValueError, match="K=3"):
        run_local(ExperimentConfig.from_dict(data))
