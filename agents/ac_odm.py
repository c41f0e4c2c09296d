"""AC-ODM: a DDPG actor-critic with a per-domain critic that picks the data mixture (docs/reference.md, R3).

Dimension legend: B = batch, K = domains, S = observation features, C = critics.

The actor maps the (scale-free) training-state observation to a mixture on the simplex; the critic
scores ``[obs, weights]`` with one Q-value per domain, trained on the env's K reward parts
(``Transition.reward_K``); the actor maximises the sum of the heads (the reference takes their mean:
the same direction, K times smaller) minus ``entropy_coef`` times its KL divergence to a prior mixture.
The learning rule is two functions of (networks, optimisers, batch, config), read top to bottom:

- ``actor_critic_update``: one DDPG/TD3 step after warm-up;
- ``warmup_update``: the warm-up's step (behaviour-clone the teacher, fit the critic).

``ActorCriticMixer`` holds the state and decides which to run. What differs from the authors' code
(bug ids of ``docs/reference.md``), on purpose:

- each network is stepped by its own AdamW after its own loss (B1); targets have no optimizer (B6);
- one LR schedule per network: its base LR (``actor_lr``, ``critic_lr``), constant, or cosine down to
  ``min_lr_ratio`` over the post-warmup updates; constant during warmup (B2, B3);
- TD targets are computed under ``no_grad`` (B4); warmup fits the critic with bootstrapped targets
  (the online networks stand in for the targets, which are hard-copied at the end of warmup), or the
  reference's ``(1 + gamma) r`` with ``warmup_critic_target: reference`` (B5);
- exploration is seeded logit-Gaussian or Dirichlet noise around the actor's mixture, decaying per
  decision, and every action is projected onto the simplex with the floor (B10);
- replay is a numpy ring buffer with its own generator; an invalid or non-finite transition is
  dropped (B14).

Exploration noise is drawn from a generator seeded by ``(seed, decision index)``, so ``act`` changes no
state: a copy that observes the same transitions and holds the same ``actor`` weights acts identically
(how the Ray layer's acting copy works). The mixer is single-threaded.

There is no terminal mask: the mixing task never terminates (gamma < 1 discounts an infinite horizon);
the run's end is a truncation, which bootstraps like any other step.

Modes: ``online`` learns end to end beside the LM; ``frozen`` (proxy transfer) loads a policy file
written by ``save_policy`` and only acts: it still follows the teacher during warmup (as the
reference does), never explores and never changes a parameter. An MLflow artifact URI in
``config.policy`` must be resolved to a local file by the caller (``ray_jobs``); agents never import mlflow.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents.base import BaseMixer, Transition, register_mixer
from agents.config import AgentConfig
from agents.greedy import GreedyMixer
from agents.networks import Actor, Critic, hard_update, polyak_update
from agents.odm import SmoothedMeanMixer
from agents.replay import ReplayBatch, ReplayBuffer

log = logging.getLogger(__name__)

POLICY_FORMAT = "acodm-policy"
POLICY_VERSION = 1
_WEIGHT_EPS = 1e-8  # keeps log-weights and Dirichlet concentrations finite


@dataclass
class Networks:
    """The four networks of DDPG: online actor and critic, and their slowly-moving targets."""

    actor: Actor
    critic: Critic
    actor_target: Actor
    critic_target: Critic


@dataclass
class Optimisers:
    """One optimiser per online network (spec B1: never one optimiser for both)."""

    actor: torch.optim.Optimizer
    critic: torch.optim.Optimizer


def actor_critic_update(
    nets: Networks,
    opt: Optimisers,
    batch: ReplayBatch,
    cfg: AgentConfig,
    *,
    log_prior_K: torch.Tensor,
    train_actor: bool,
    noise: torch.Generator,
) -> dict[str, float]:
    """One DDPG step (TD3 with twin critics, target noise and ``train_actor`` every ``policy_delay``).

    Critic: regress each head on ``r_k + gamma * Q'_k(s', pi'(s'))`` (min over twin critics).
    Actor: maximise ``sum_k Q_k(s, pi(s)) - entropy_coef * KL(pi(s) || prior)``, then Polyak-average
    both targets toward the online networks.
    """
    device = next(nets.actor.parameters()).device
    obs_BS, weights_BK, rewards_BK, next_obs_BS = (torch.as_tensor(x, device=device) for x in batch)
    with torch.no_grad():  # TD target (spec B4); no terminal mask: the task never terminates
        next_logits_BK = nets.actor_target.logits(next_obs_BS)
        if cfg.target_noise > 0:  # TD3 target policy smoothing, in logit space: stays on the simplex
            noise_BK = torch.randn(next_logits_BK.shape, generator=noise).to(device)
            next_logits_BK = next_logits_BK + cfg.target_noise * noise_BK
        next_q_CBK = nets.critic_target(next_obs_BS, torch.softmax(next_logits_BK, dim=-1))
        target_q_BK = rewards_BK + cfg.gamma * next_q_CBK.min(dim=0).values
    q_CBK = nets.critic(obs_BS, weights_BK)
    critic_loss = torch.stack([F.mse_loss(q_BK, target_q_BK) for q_BK in q_CBK]).sum()
    opt.critic.zero_grad(set_to_none=True)
    critic_loss.backward()
    opt.critic.step()

    log_pi_BK = F.log_softmax(nets.actor.logits(obs_BS), dim=-1)
    kl_to_prior = (log_pi_BK.exp() * (log_pi_BK - log_prior_K)).sum(dim=-1).mean()
    actor_loss = None
    if train_actor:
        nets.critic.requires_grad_(False)  # the actor's objective must not train the critic
        actor_loss = -nets.critic.q1(obs_BS, log_pi_BK.exp()).sum(dim=-1).mean() + cfg.entropy_coef * kl_to_prior
        nets.critic.requires_grad_(True)
        opt.actor.zero_grad(set_to_none=True)
        actor_loss.backward()
        opt.actor.step()
        polyak_update(list(nets.actor.parameters()), list(nets.actor_target.parameters()), cfg.tau)
        polyak_update(list(nets.critic.parameters()), list(nets.critic_target.parameters()), cfg.tau)
    return {
        "agent/critic_loss": critic_loss.item(),
        "agent/actor_loss": math.nan if actor_loss is None else actor_loss.item(),
        "agent/kl_to_prior": kl_to_prior.item(),
        "agent/q_mean": q_CBK[0].mean().item(),
        "agent/target_q_mean": target_q_BK.mean().item(),
    }


def warmup_update(
    nets: Networks, opt: Optimisers, batch: ReplayBatch, cfg: AgentConfig, *, log_prior_K: torch.Tensor
) -> dict[str, float]:
    """One warm-up step: behaviour-clone the teacher's mixtures (MSE) and fit the critic.

    The critic's target bootstraps from the online networks (the targets are hard-copied from them at
    the end of warm-up), or is the reference's ``(1 + gamma) r`` (spec B5) with
    ``warmup_critic_target: reference``.
    """
    device = next(nets.actor.parameters()).device
    obs_BS, weights_BK, rewards_BK, next_obs_BS = (torch.as_tensor(x, device=device) for x in batch)
    with torch.no_grad():
        if cfg.warmup_critic_target == "reference":
            target_q_BK = (1.0 + cfg.gamma) * rewards_BK
        else:
            next_weights_BK = torch.softmax(nets.actor.logits(next_obs_BS), dim=-1)
            target_q_BK = rewards_BK + cfg.gamma * nets.critic(next_obs_BS, next_weights_BK).min(dim=0).values
    q_CBK = nets.critic(obs_BS, weights_BK)
    critic_loss = torch.stack([F.mse_loss(q_BK, target_q_BK) for q_BK in q_CBK]).sum()
    opt.critic.zero_grad(set_to_none=True)
    critic_loss.backward()
    opt.critic.step()

    actor_loss = F.mse_loss(nets.actor(obs_BS), weights_BK)
    opt.actor.zero_grad(set_to_none=True)
    actor_loss.backward()
    opt.actor.step()
    with torch.no_grad():
        log_pi_BK = F.log_softmax(nets.actor.logits(obs_BS), dim=-1)
        kl_to_prior = (log_pi_BK.exp() * (log_pi_BK - log_prior_K)).sum(dim=-1).mean()
    return {
        "agent/critic_loss": critic_loss.item(),
        "agent/actor_loss": actor_loss.item(),
        "agent/kl_to_prior": kl_to_prior.item(),
        "agent/q_mean": q_CBK[0].mean().item(),
        "agent/target_q_mean": target_q_BK.mean().item(),
    }


@register_mixer("ac_odm")
class ActorCriticMixer(BaseMixer):
    """AC-ODM (DDPG by default; TD3 with ``num_critics=2``, ``target_noise`` and ``policy_delay``).

    Constructor arguments are those of ``agents.base.build_mixer``. The first
    ``round(warmup_fraction * total_steps)`` decisions follow the teacher (``warmup_teacher``: the greedy
    alignment mixer, or ODM's smoothed mean) while the actor is behaviour-cloned to it and the critic is
    fitted; then the actor drives the run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.frozen = cfg.mode == "frozen"
        self.device = torch.device(cfg.device)
        # A policy file: frozen mode acts with it; online mode starts learning from it (a warm start, e.g.
        # from a proxy run), acting with it from the first decision: the warm-up would clone the teacher
        # over it, so there is none.
        policy = read_policy(cfg.policy) if cfg.policy is not None else None
        warm_start = policy is not None and not self.frozen
        self.warmup_steps = 0 if warm_start else int(round(cfg.warmup_fraction * self.total_steps))
        if warm_start:
            log.info("ac_odm: online agent warm-started from %s (no warm-up)", cfg.policy)
        init_seq, replay_seq, explore_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(4)
        # A policy brings its own architecture; otherwise the config's.
        self.architecture = (
            dict(policy["architecture"])
            if policy
            else {
                "hidden_width": cfg.hidden_width,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_critics": cfg.num_critics,
            }
        )
        width, depth = self.architecture["hidden_width"], self.architecture["num_hidden_layers"]
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global torch RNG
            torch.manual_seed(int(init_seq.generate_state(1)[0]))
            actor = Actor(self.obs_dim, self.num_domains, width, depth).to(self.device)
            critic = Critic(self.obs_dim, self.num_domains, width, depth, self.architecture["num_critics"])
            critic = critic.to(self.device)
        self.nets = Networks(
            actor, critic, copy.deepcopy(actor).requires_grad_(False), copy.deepcopy(critic).requires_grad_(False)
        )
        self.opt = Optimisers(
            torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay, foreach=True),
            torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay, foreach=True),
        )
        self.replay_buffer = ReplayBuffer(
            cfg.buffer_size, self.obs_dim, self.num_domains, np.random.default_rng(replay_seq)
        )
        self.explore_entropy = int(explore_seq.generate_state(1)[0])  # noise of decision n: (entropy, n)
        self.noise_generator = torch.Generator().manual_seed(int(noise_seq.generate_state(1)[0]))
        teacher_cls = GreedyMixer if cfg.warmup_teacher == "greedy" else SmoothedMeanMixer
        self.teacher = teacher_cls(*args, **kwargs)
        # Sum of the warm-up mixtures applied: the KL term's prior with ``entropy_prior: warmup``.
        self.warmup_mixture_sum_K = np.zeros(self.num_domains)
        self.num_decisions = 0  # transitions observed (= env steps taken)
        self.num_updates = 0  # critic steps, warmup included
        self.num_main_updates = 0  # critic steps after warmup: the LR schedule's and policy delay's clock
        self.num_skipped = 0  # transitions dropped as invalid or non-finite
        self.update_credit = 0.0  # owed gradient updates (updates_per_step per stored transition)
        self.targets_synced = self.warmup_steps == 0  # targets are copies of the online nets from init
        if policy is not None:
            self._load_policy(policy, str(cfg.policy))
        if self.frozen:
            for net in (self.actor, self.critic):
                net.requires_grad_(False)

    @property
    def actor(self) -> Actor:
        """The online actor: the policy ``act`` reads after warm-up."""
        return self.nets.actor

    @property
    def critic(self) -> Critic:
        """The online critic (K heads; C critics)."""
        return self.nets.critic

    @property
    def policy(self) -> Actor:
        """``act`` reads the online actor (``BaseMixer.policy``)."""
        return self.nets.actor

    # -- acting ----------------------------------------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        """True while the next decision belongs to the teacher-driven warmup."""
        return self.num_decisions < self.warmup_steps

    @property
    def exploration_scale(self) -> float:
        """The noise scale of the next decision: ``max(min_scale, scale * decay ** n)`` after n decisions
        past the warm-up."""
        exp = self.config.exploration
        if exp.kind == "none":
            return 0.0
        return max(exp.min_scale, exp.scale * exp.decay ** max(0, self.num_decisions - self.warmup_steps))

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """Warmup: the teacher's weights. Then the actor's mixture, with seeded noise if ``explore``
        (never in frozen mode), projected onto the simplex with the floor. Changes no state."""
        obs_S = self._check_obs(obs)
        if not np.all(np.isfinite(obs_S)):
            raise ValueError(f"obs must be finite, got {obs_S.tolist()}")
        explore = explore and not self.frozen
        if self.in_warmup:
            teacher_K = self.teacher.act(obs_S)
            if explore and self.config.warmup_explore:
                # Vary the warm-up's actions around the teacher's, so the critic sees what the reward
                # does near the teacher's mixture before the actor moves (undecayed noise).
                return self._finish(self._explore(np.log(np.maximum(teacher_K, _WEIGHT_EPS)), self.config.exploration.scale))
            return self._finish(teacher_K)
        with torch.no_grad():
            logits_K = self.actor.logits(torch.tensor(obs_S, device=self.device)[None])[0]
        logits_K = logits_K.to("cpu", torch.float64).numpy()
        return self._finish(self._explore(logits_K, self.exploration_scale) if explore else _softmax(logits_K))

    def _explore(self, logits_K: np.ndarray, scale: float) -> np.ndarray:
        """Logit-Gaussian: ``softmax(logits + N(0, scale^2))``; Dirichlet: ``Dir(weights / scale)``; drawn
        from the generator of this decision."""
        kind = self.config.exploration.kind
        rng = np.random.default_rng([self.explore_entropy, self.num_decisions])
        if kind == "logit_gaussian" and scale > 0:
            return _softmax(logits_K + rng.normal(0.0, scale, size=logits_K.shape))
        if kind == "dirichlet" and scale > 0:
            return rng.dirichlet(np.maximum(_softmax(logits_K), _WEIGHT_EPS) / scale)
        return _softmax(logits_K)

    # -- learning --------------------------------------------------------------------------------------
    def observe(self, transition: Transition) -> None:
        """Store ``(obs, applied mixture, reward_K, next_obs)``; feed the teacher (during warmup, and
        always when it is the KL term's prior). Frozen mode stores nothing.

        An invalid transition (no Gram matrix, a skipped LM step) or one with non-finite values is
        dropped, so the critic never fits placeholder rewards (spec B14).
        """
        obs_S, next_obs_S = self._check_obs(transition.obs, "obs"), self._check_obs(transition.next_obs, "next_obs")
        weights_K = self._check_weights(transition.weights)
        rewards_K = self._check_vector(transition.reward_K, "reward_K")
        if self.in_warmup or self.config.entropy_prior == "teacher":
            self.teacher.observe(transition)
        if self.in_warmup:
            self.warmup_mixture_sum_K += weights_K
        self.num_decisions += 1
        if self.frozen:
            return
        finite = all(np.all(np.isfinite(x)) for x in (obs_S, next_obs_S, rewards_K))
        if not (finite and transition.valid):
            self.num_skipped += 1
            log.warning("ac_odm: dropped transition %d (invalid or non-finite reward/observation)", self.num_decisions)
            return
        self.replay_buffer.add(obs_S, weights_K, rewards_K, next_obs_S)
        self.update_credit += self.config.updates_per_step

    def update(self) -> dict[str, float]:
        """Run the gradient updates owed (``updates_per_step`` per stored transition); the mean metrics
        of those updates, or ``{}`` when none ran (frozen mode, or credit below one update)."""
        num_steps = 0 if self.frozen else int(self.update_credit)
        self.update_credit -= num_steps
        if num_steps == 0:
            return {}
        runs = [self._gradient_step() for _ in range(num_steps)]
        return {key: _mean_finite([m[key] for m in runs]) for key in runs[0]}

    def _gradient_step(self) -> dict[str, float]:
        """Pick the warm-up or the main update for the newest decision, with this step's learning rates."""
        cfg = self.config
        warmup = self.num_decisions <= self.warmup_steps  # the newest transition is a warmup decision
        if not warmup and not self.targets_synced:  # end of warmup: the targets start as copies, once
            hard_update(self.actor, self.nets.actor_target)
            hard_update(self.critic, self.nets.critic_target)
            self.targets_synced = True
        actor_lr = self._set_lr(self.opt.actor, cfg.actor_lr, warmup)
        critic_lr = self._set_lr(self.opt.critic, cfg.critic_lr, warmup)
        batch = self.replay_buffer.sample(cfg.batch_size)
        if warmup:
            metrics = warmup_update(self.nets, self.opt, batch, cfg, log_prior_K=self._log_prior_K())
        else:
            metrics = actor_critic_update(
                self.nets, self.opt, batch, cfg, log_prior_K=self._log_prior_K(),
                train_actor=self.num_main_updates % cfg.policy_delay == 0, noise=self.noise_generator,
            )
            self.num_main_updates += 1
        self.num_updates += 1
        return {
            **metrics,
            "agent/actor_lr": actor_lr,
            "agent/critic_lr": critic_lr,
            "agent/exploration_scale": self.exploration_scale,
            "agent/warmup": float(warmup),
            "agent/buffer_size": float(len(self.replay_buffer)),
            "agent/num_updates": float(self.num_updates),
            "agent/skipped_transitions": float(self.num_skipped),
        }

    def _log_prior_K(self) -> torch.Tensor:
        """log of the KL term's prior: uniform, the mean warm-up mixture (uniform before any), or the
        teacher's current mixture (the teacher keeps learning after the warm-up)."""
        prior_K = np.full(self.num_domains, 1.0 / self.num_domains)
        total = self.warmup_mixture_sum_K.sum()
        if self.config.entropy_prior == "warmup" and total > 0:
            prior_K = np.maximum(self.warmup_mixture_sum_K / total, _WEIGHT_EPS)
        elif self.config.entropy_prior == "teacher":
            prior_K = np.maximum(self.teacher.act(np.zeros(self.obs_dim, dtype=np.float32)), _WEIGHT_EPS)
        return torch.as_tensor(np.log(prior_K / prior_K.sum()), dtype=torch.float32, device=self.device)

    def _set_lr(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: bool) -> float:
        """The schedule: ``base_lr`` in warmup and for ``constant``; ``cosine`` decays from ``base_lr`` to
        ``min_lr_ratio * base_lr`` over the post-warmup updates, ``(total_steps - warmup_steps) *
        updates_per_step``, then stays there."""
        cfg = self.config
        factor = 1.0
        if not warmup and cfg.lr_schedule == "cosine":
            horizon = max(1, round((self.total_steps - self.warmup_steps) * cfg.updates_per_step))
            progress = min(1.0, self.num_main_updates / horizon)
            factor = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor
        return base_lr * factor

    # -- state and policy files ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Networks, optimizers, LR-schedule clock, replay contents, RNG states, counters and the teacher
        (a deep copy, loadable with ``torch.load(weights_only=True)``)."""
        state = {
            **self._header(),
            "architecture": dict(self.architecture),
            **{name: module.state_dict() for name, module in self._modules().items()},
            "lr_schedule": {"kind": self.config.lr_schedule, "num_main_updates": self.num_main_updates,
                            "warmup_steps": self.warmup_steps},
            "replay_buffer": self.replay_buffer.state_dict(),
            "explore_entropy": self.explore_entropy,
            "noise_generator": self.noise_generator.get_state(),
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "teacher": self.teacher.state_dict(),
            "warmup_mixture_sum_K": torch.tensor(self.warmup_mixture_sum_K, dtype=torch.float64),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a state of another K, observation size, domain list or architecture
        is rejected with both values in the message."""
        self._check_header(state)
        if dict(state["architecture"]) != self.architecture:
            raise ValueError(
                f"state has architecture {dict(state['architecture'])}, this mixer {self.architecture}"
            )
        for name, module in self._modules().items():
            module.load_state_dict(state[name])
        self.num_main_updates = int(state["lr_schedule"]["num_main_updates"])
        # the warm-up length is fixed when a run starts: a run extended to more decisions keeps it
        self.warmup_steps = int(state["lr_schedule"].get("warmup_steps", self.warmup_steps))
        self.replay_buffer.load_state_dict(state["replay_buffer"])
        self.explore_entropy = int(state["explore_entropy"])
        self.noise_generator.set_state(state["noise_generator"])
        for name in _COUNTERS:
            setattr(self, name, type(getattr(self, name))(state["counters"][name]))
        self.teacher.load_state_dict(state["teacher"])
        self.warmup_mixture_sum_K = np.asarray(state["warmup_mixture_sum_K"], dtype=np.float64).copy()

    def _modules(self) -> dict[str, Any]:
        """What ``state_dict`` saves under each name (networks and optimisers)."""
        nets, opt = self.nets, self.opt
        return {
            "actor": nets.actor, "critic": nets.critic, "actor_target": nets.actor_target,
            "critic_target": nets.critic_target, "actor_optimizer": opt.actor, "critic_optimizer": opt.critic,
        }

    def save_policy(self, path: str | os.PathLike[str]) -> None:
        """Write the actor and critic with a header (K, observation size, domain names, architecture,
        config) atomically, for ``mode: frozen`` (proxy transfer)."""
        payload = {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            **self._header(),
            "architecture": dict(self.architecture),
            "config": self.config.model_dump(mode="json"),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, target)

    def load_policy(self, path: str | os.PathLike[str]) -> None:
        """Load a policy file's actor and critic into this mixer (targets become copies of them)."""
        self._load_policy(read_policy(path), str(path))

    def _load_policy(self, policy: Mapping[str, Any], path: str) -> None:
        got = (policy["num_domains"], policy["obs_dim"])
        if got != (self.num_domains, self.obs_dim):
            raise ValueError(
                f"policy {path} was trained with K={got[0]} domains and observation size {got[1]}, "
                f"but this run has K={self.num_domains} domains and observation size {self.obs_dim}"
            )
        if list(policy["domain_names"]) != self.domain_names:
            raise ValueError(
                f"policy {path} was trained on domains {list(policy['domain_names'])}, "
                f"but this run's domains are {self.domain_names}"
            )
        if dict(policy["architecture"]) != self.architecture:
            raise ValueError(
                f"policy {path} has architecture {dict(policy['architecture'])}, this mixer {self.architecture}"
            )
        self.actor.load_state_dict(policy["actor"])
        self.critic.load_state_dict(policy["critic"])
        hard_update(self.actor, self.nets.actor_target)
        hard_update(self.critic, self.nets.critic_target)


_COUNTERS = ("num_decisions", "num_updates", "num_skipped", "update_credit", "targets_synced")


def read_policy(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read and check a policy file written by ``ActorCriticMixer.save_policy``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an acodm policy of a supported version.
    """
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"agent.policy = {str(path)!r}: no policy file there (a local path is expected; "
            "resolve MLflow artifact URIs before building the mixer)"
        )
    try:
        policy = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        # torch's own message may suggest weights_only=False, i.e. running code from an untrusted file
        raise ValueError(
            f"agent.policy = {str(path)!r} is not a readable acodm policy file (torch.load failed with "
            f"{type(exc).__name__}); write one with ActorCriticMixer.save_policy or take a run's policy.pt"
        ) from None
    if not isinstance(policy, dict) or policy.get("format") != POLICY_FORMAT:
        raise ValueError(
            f"agent.policy = {str(path)!r} is not an acodm policy file (format {POLICY_FORMAT!r})"
        )
    if policy.get("version") != POLICY_VERSION:
        raise ValueError(f"policy {path} has version {policy.get('version')}, expected {POLICY_VERSION}")
    return policy


def _mean_finite(values: list[float]) -> float:
    """Mean over the finite values (a delayed actor step reports NaN); NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _softmax(logits_K: np.ndarray) -> np.ndarray:
    exp_K = np.exp(logits_K - logits_K.max())
    return exp_K / exp_K.sum()
