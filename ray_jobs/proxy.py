"""``acodm proxy``: learn the mixing policy with a small LM, then steer the target LM with it frozen.

AC-ODM's proxy mode (docs/reference.md, R3): a full online run of the agent beside a cheap proxy model produces a
policy file; the target run loads it in ``frozen`` mode (act only, no updates; the ODM warmup still
drives the first steps). The observation features are scale-free (z-scored per step, progress in
[0, 1]), which is what lets a policy transfer across model sizes and budgets. Both runs are children of
one MLflow parent run; the policy is logged on the parent too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray_jobs.config import ExperimentConfig

log = logging.getLogger(__name__)


def _monitored_layers(cfg: ExperimentConfig, lm: Any) -> int:
    from envs.model import PRESETS

    blocks = lm.num_layers or PRESETS[lm.preset].num_layers
    return min(cfg.env.probe.num_monitored_layers, blocks)


def proxy_and_target(cfg: ExperimentConfig) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The two run configs: ``<name>-proxy`` (small LM, agent online) and ``<name>-target`` (frozen).

    Raises:
        ValueError: the agent is not AC-ODM, or the two models would give observations of different
            sizes (their monitored-layer counts differ).
    """
    if cfg.agent.kind != "ac_odm":
        raise ValueError(f"acodm proxy needs agent.kind = 'ac_odm', got {cfg.agent.kind!r}")
    l_proxy, l_target = _monitored_layers(cfg, cfg.proxy.lm), _monitored_layers(cfg, cfg.lm)
    if l_proxy != l_target:
        raise ValueError(
            f"the proxy LM monitors {l_proxy} layers and the target LM {l_target}, so their observations "
            f"differ in size; set env.probe.num_monitored_layers <= {min(l_proxy, l_target)}"
        )
    data = cfg.to_dict()
    proxy = {**data, "name": f"{cfg.name}-proxy", "lm": cfg.proxy.lm.model_dump(mode="json")}
    proxy["train"] = {**data["train"], "total_steps": cfg.proxy.total_steps or cfg.train.total_steps}
    proxy["agent"] = {**data["agent"], "mode": "online", "policy": None}
    policy = (Path(cfg.output_dir) / f"{cfg.name}-proxy" / "policy.pt").resolve()
    target = {**data, "name": f"{cfg.name}-target"}
    target["agent"] = {**data["agent"], "mode": "frozen", "policy": str(policy)}
    return (
        ExperimentConfig.from_dict(proxy, source="proxy run"),
        ExperimentConfig.from_dict(target, source="target run"),
    )


def run_proxy(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the proxy, then the target; returns both runs' summaries."""
    proxy_cfg, target_cfg = proxy_and_target(cfg)
    parent = None
    if cfg.tracking.enabled:
        from ray_jobs.tracking import make_sink

        parent = make_sink(cfg, 0, run_name=f"{cfg.name}-proxy-pipeline", tags={"acodm.role": "pipeline"})
    parent_id = getattr(parent, "run_id", None)
    status = "FAILED"
    try:
        if cfg.ray.enabled:
            from ray_jobs.train import run_train as runner
        else:
            from ray_jobs.driver import run_local as runner
        log.info("proxy run: %s (%s) with the agent online", proxy_cfg.name, proxy_cfg.lm.preset)
        proxy = runner(proxy_cfg, parent_run_id=parent_id, tags={"acodm.role": "proxy"})
        policy = Path(target_cfg.agent.policy or "")
        if not policy.is_file():
            raise RuntimeError(f"the proxy run finished without writing its policy {policy}")
        if parent is not None:
            parent.log_artifact(policy)
        log.info("target run: %s (%s) steered by the frozen policy %s", target_cfg.name, target_cfg.lm.preset, policy)
        target = runner(target_cfg, parent_run_id=parent_id, tags={"acodm.role": "target"})
        status = "FINISHED"
        return {"proxy": proxy, "target": target, "policy": str(policy), "parent_run_id": parent_id}
    finally:
        if parent is not None:
            parent.close(status)
