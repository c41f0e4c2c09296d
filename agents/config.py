"""Typed configuration of the mixing agents (AC-ODM, ODM bandits, static mixers).

Kept in ``agents`` (not ``envs``) so that agents never import env internals. The number of domains K is
not configured here: it comes from the action space handed to the agent's constructor.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AgentKind = Literal["ac_odm", "greedy", "mirror_descent", "smoothed_mean", "exp3", "uniform", "natural", "fixed"]


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ExplorationConfig(_StrictModel):
    """Exploration noise around the actor's mixture.

    ``logit_gaussian``: add N(0, scale^2) to the log-weights, then softmax. ``dirichlet``: sample
    Dirichlet(concentration * weights_K). The scale decays geometrically per decision down to
    ``min_scale`` (for ``dirichlet`` the concentration grows by 1/decay instead).
    """

    kind: Literal["logit_gaussian", "dirichlet", "none"] = "logit_gaussian"
    scale: float = Field(0.3, ge=0, description="Std of logit noise, or 1/concentration for dirichlet.")
    decay: float = Field(0.999, gt=0, le=1, description="Multiplicative decay of the scale per decision.")
    min_scale: float = Field(0.02, ge=0)


class AgentConfig(_StrictModel):
    """Which mixer drives the run, and its hyperparameters."""

    kind: AgentKind = "ac_odm"
    mode: Literal["online", "frozen"] = Field("online", description="frozen = proxy transfer: act only.")
    policy: str | None = Field(
        None,
        description="Policy file or MLflow artifact URI: frozen mode acts with it; online mode starts learning "
        "from it (a warm start, no warm-up).",
    )
    weights: dict[str, float] | None = Field(None, description="kind fixed: weight per domain name.")
    # actor-critic
    gamma: float = Field(0.95, ge=0, lt=1)
    tau: float = Field(0.001, gt=0, le=1)
    actor_lr: float = Field(1e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final LR as a fraction of the base LR.")
    weight_decay: float = Field(0.0, ge=0)
    hidden_width: int = Field(1024, gt=0)
    num_hidden_layers: int = Field(5, gt=0)
    buffer_size: int = Field(10_000, gt=0)
    batch_size: int = Field(32, gt=0)
    updates_per_step: float = Field(1.0, gt=0, description="Gradient updates per decision after warmup.")
    warmup_fraction: float = Field(0.02, ge=0, lt=1, description="Share of the budget driven by ODM.")
    warmup_critic_target: Literal["bootstrap", "reference"] = "bootstrap"
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    num_critics: int = Field(1, ge=1, le=2, description="2 = TD3 twin critics.")
    policy_delay: int = Field(1, ge=1)
    target_noise: float = Field(0.0, ge=0, description="TD3 target policy smoothing (logit std).")
    entropy_coef: float = Field(
        1.0,
        ge=0,
        description="alpha of the actor's KL(pi(s) || prior) term (maximum-entropy actor-critic on the simplex).",
    )
    entropy_prior: Literal["uniform", "warmup", "teacher"] = Field(
        "teacher",
        description="The KL term's prior: uniform, the mean warm-up mixture, or the teacher's current "
        "mixture (the teacher keeps learning after the warm-up).",
    )
    warmup_explore: bool = Field(
        False, description="Explore around the teacher's mixture during the warm-up (the critic sees actions vary)."
    )
    warmup_teacher: Literal["greedy", "odm"] = Field(
        "greedy", description="Who drives the warm-up: the greedy alignment mixer or ODM's smoothed mean."
    )
    device: str = "cpu"
    # ODM bandits
    smoothing: float = Field(0.5, ge=0, lt=1, description="ODM smoothed-mean alpha.")
    exp3_reward_scale: float = Field(0.1, gt=0, description="EXP3 reward multiplier (ODM divides by 10).")
    # closed-form alignment mixers (agents.greedy); also the AC-ODM warm-up teacher
    greedy_smoothing: float = Field(0.9, ge=0, lt=1, description="EMA factor of the greedy mixer's Gram matrix.")
    greedy_objective: Literal["direction", "quadratic"] = "direction"
    greedy_curvature: float = Field(1.0, gt=0, description="lam of greedy_objective quadratic.")
    mirror_descent_lr: float = Field(0.1, gt=0, description="eta of mirror descent: log w += eta * alignment.")

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.kind == "fixed" and not self.weights:
            raise ValueError("kind 'fixed' needs 'weights' (a weight per domain name)")
        if self.kind != "fixed" and self.weights is not None:
            raise ValueError(f"'weights' is only used by kind 'fixed', not {self.kind!r}")
        if self.mode == "frozen" and self.kind != "ac_odm":
            raise ValueError(f"mode 'frozen' applies to kind 'ac_odm', not {self.kind!r}")
        if self.policy and self.kind != "ac_odm":
            raise ValueError(f"policy applies to kind 'ac_odm' (frozen or warm-started), not {self.kind!r}")
        if self.mode == "frozen" and not self.policy:
            raise ValueError("mode 'frozen' needs 'policy' (a policy file or MLflow artifact URI)")
        if self.exploration.min_scale > self.exploration.scale:
            raise ValueError("exploration.min_scale must be <= exploration.scale")
        return self
