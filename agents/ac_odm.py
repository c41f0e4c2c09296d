"""AC-ODM: a DDPG actor-critic with a per-domain critic that picks the data mixture (spec §1.5-§1.12).

Dimension legend: B = batch, K = domains, S = observation features, C = critics.

The actor maps the (scale-free) training-state observation to a mixture on the simplex; the critic
scores ``[obs, weights]`` with one Q-value per domain, trained on the env's K reward parts
(``info["reward_parts_K"]``); the actor maximises the sum of the heads (the reference takes their
mean: the same direction, K times smaller). The whole learning rule is
``ActorCriticMixer._train_step``. What differs from the authors' code (spec §1.13), on purpose:

- each network is stepped by its own AdamW after its own loss (B1); targets have no optimizer (B6);
- one LR schedule per network: its base LR (``actor_lr``, ``critic_lr``), constant, or cosine down to
  ``min_lr_ratio`` over the post-warmup updates; constant during warmup (B2, B3);
- TD targets are computed under ``no_grad`` (B4); warmup fits the critic with bootstrapped targets
  (the online networks stand in for the targets, which are hard-copied at the end of warmup), or the
  reference's ``(1 + gamma) r`` with ``warmup_critic_target: reference`` (B5);
- exploration is seeded logit-Gaussian or Dirichlet noise around the actor's mixture, decaying per
  decision, and every action is projected onto the simplex with the floor (B10);
- replay is a numpy ring buffer with its own generator; the transition of a step with a non-finite
  observation or reward is dropped (B14).

Concurrency: ``update`` may run on another thread while ``act`` and ``observe`` are called (the Ray
agent actor does this, so the LM never waits for an agent update). ``act`` reads a published copy of
the actor, double-buffered: an update trains ``self.actor``, then copies it into the back buffer and
swaps it to the front under a lock held only for the swap and for ``act``'s forward pass, so ``act``
never waits for a gradient step and never sees half of one. ``observe`` and ``update`` share the
replay buffer and the counters under a second short lock. Called from one thread (the in-process loop),
everything happens in order and a run repeats exactly.

Split acting (``acts_from_snapshot``): a copy of the mixer in another process can act from the
learner's ``policy_snapshot`` (``load_policy_snapshot``), record decisions with ``observe_acting`` and hand
its exploration state back with ``acting_state``/``load_acting_state``; driven in order, the pair makes
exactly the run of one mixer. Ray's rank 0 acts this way, so an LM step waits for no actor call.

There is no terminal mask: the mixing task never terminates (gamma < 1 discounts an infinite horizon);
the run's end is a truncation, which bootstraps like any other step.

Modes: ``online`` learns end to end beside the LM; ``frozen`` (proxy transfer) loads a policy file
written by ``save_policy`` and only acts: it still follows the ODM teacher during warmup (as the
reference does), never explores and never changes a parameter. An MLflow artifact URI in
``config.policy`` must be resolved to a local file by the caller (``ray_jobs``); agents never import mlflow.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents.base import BaseMixer, register_mixer
from agents.greedy import GreedyMixer
from agents.networks import Actor, Critic, hard_update, polyak_update
from agents.odm import SmoothedMeanMixer
from agents.replay import ReplayBuffer

logger = logging.getLogger(__name__)

POLICY_FORMAT = "acodm-policy"
POLICY_VERSION = 1
_WEIGHT_EPS = 1e-8  # keeps log-weights and Dirichlet concentrations finite


@register_mixer("ac_odm")
class ActorCriticMixer(BaseMixer):
    """AC-ODM (DDPG by default; TD3 with ``num_critics=2``, ``target_noise`` and ``policy_delay``).

    Constructor arguments are those of ``agents.base.build_mixer``. The first
    ``round(warmup_fraction * total_steps)`` decisions follow ODM's smoothed-mean teacher while the
    actor is behaviour-cloned to it and the critic is fitted; then the actor drives the run.
    """

    concurrent_update = True  # ``update`` may overlap ``act``/``observe`` on another thread
    acts_from_snapshot = True  # a copy can act from the learner's published policy (split acting)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.frozen = cfg.mode == "frozen"
        self.device = torch.device(cfg.device)
        self.warmup_steps = int(round(cfg.warmup_fraction * self.total_steps))
        init_seq, replay_seq, explore_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(4)
        policy = read_policy(cfg.policy) if self.frozen else None
        # A frozen policy brings its own architecture; an online run takes the config's.
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
            self.actor = Actor(self.obs_dim, self.num_domains, width, depth).to(self.device)
            self.critic = Critic(
                self.obs_dim, self.num_domains, width, depth, self.architecture["num_critics"]
            ).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        # The acting policy, double-buffered: act reads the front, an update fills the back and swaps.
        self._acting = copy.deepcopy(self.actor).requires_grad_(False)
        self._acting_back = copy.deepcopy(self.actor).requires_grad_(False)
        self.policy_version = 0  # policies published so far (one per update() that trained)
        self._init_locks()
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # Parameter lists, fixed for the mixer's life (loading copies values in place).
        self._params = {
            n: list(getattr(self, n).parameters())
            for n in ("actor", "critic", "actor_target", "critic_target")
        }
        self.actor_optimizer = torch.optim.AdamW(
            self.actor.parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay, foreach=True
        )
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay, foreach=True
        )
        self.replay_buffer = ReplayBuffer(
            cfg.buffer_size, self.obs_dim, self.num_domains, np.random.default_rng(replay_seq)
        )
        self.explore_rng = np.random.default_rng(explore_seq)
        self.noise_generator = torch.Generator().manual_seed(int(noise_seq.generate_state(1)[0]))
        # The warm-up teacher: the greedy alignment mixer (default), or ODM's paper method (the reference).
        teacher_cls = GreedyMixer if cfg.warmup_teacher == "greedy" else SmoothedMeanMixer
        self.teacher = teacher_cls(*args, **kwargs)
        # Sum of the warm-up mixtures applied: the KL term's prior with ``entropy_prior: warmup``.
        self.warmup_mixture_sum_K = np.zeros(self.num_domains)
        self.num_decisions = 0  # transitions observed (= env steps taken)
        self.num_updates = 0  # critic steps, warmup included
        self.num_main_updates = 0  # critic steps after warmup: the LR schedule's and policy delay's clock
        self.num_explore = 0  # exploring actions after warmup: the noise decay's clock
        self.num_skipped = 0  # transitions dropped for non-finite values
        self.update_credit = 0.0  # owed gradient updates (updates_per_step per stored transition)
        self.targets_synced = self.warmup_steps == 0  # targets are copies of the online nets from init
        if policy is not None:
            self._load_policy(policy, str(cfg.policy))
            for net in (self.actor, self.critic):
                net.requires_grad_(False)

    def _init_locks(self) -> None:
        self._data_lock = threading.Lock()  # replay buffer and counters shared by observe and update
        self._policy_lock = threading.Lock()  # the front acting buffer: act's forward pass and the swap

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # locks cannot be copied or pickled; a copy gets its own
        del state["_data_lock"], state["_policy_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_locks()

    def _publish_policy(self) -> None:
        """Make the trained actor the acting policy: copy it into the back buffer (nobody reads that),
        then swap the buffers under the policy lock (held for a pointer swap, not for a copy)."""
        hard_update(self.actor, self._acting_back)
        with self._policy_lock:
            self._acting, self._acting_back = self._acting_back, self._acting
            self.policy_version += 1

    # -- acting ----------------------------------------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        """True while the next decision belongs to the ODM-driven warmup."""
        return self.num_decisions < self.warmup_steps

    @property
    def exploration_scale(self) -> float:
        """Current noise scale: ``max(min_scale, scale * decay ** n)`` after n exploring decisions."""
        exp = self.config.exploration
        if exp.kind == "none":
            return 0.0
        return max(exp.min_scale, exp.scale * exp.decay**self.num_explore)

    def act(self, obs: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """Warmup: the ODM teacher's weights. Then the actor's mixture, with seeded noise if ``explore``
        (never in frozen mode), projected onto the simplex with the floor."""
        obs_S = self._check_obs(obs)
        if not np.all(np.isfinite(obs_S)):
            raise ValueError(f"obs must be finite, got {obs_S.tolist()}")
        if self.in_warmup:
            teacher_K = self.teacher.act(obs_S)
            if explore and not self.frozen and self.config.warmup_explore:
                # Vary the warm-up's actions around the teacher's, so the critic sees what the reward
                # does near the teacher's mixture before the actor moves (undecayed noise).
                teacher_K = self._explore(np.log(np.maximum(teacher_K, _WEIGHT_EPS)), decayed=False)
            return self._finish(teacher_K)
        obs_1S = torch.tensor(obs_S, device=self.device)[None]  # a copy: Ray hands read-only arrays
        with self._policy_lock, torch.no_grad():  # the published policy, never one mid-update
            logits_K = self._acting.logits(obs_1S)[0].to("cpu", torch.float64).numpy()
        weights_K = _softmax(logits_K)
        if explore and not self.frozen:
            weights_K = self._explore(logits_K)
            self.num_explore += 1
        return self._finish(weights_K)

    def _explore(self, logits_K: np.ndarray, decayed: bool = True) -> np.ndarray:
        """Logit-Gaussian: ``softmax(logits + N(0, scale^2))``; Dirichlet: ``Dir(weights / scale)``."""
        kind = self.config.exploration.kind
        scale = self.exploration_scale if decayed else (0.0 if kind == "none" else self.config.exploration.scale)
        if kind == "logit_gaussian" and scale > 0:
            return _softmax(logits_K + self.explore_rng.normal(0.0, scale, size=logits_K.shape))
        if kind == "dirichlet" and scale > 0:
            return self.explore_rng.dirichlet(np.maximum(_softmax(logits_K), _WEIGHT_EPS) / scale)
        return _softmax(logits_K)

    # -- learning --------------------------------------------------------------------------------------
    def observe(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        info: Mapping[str, Any],
    ) -> None:
        """Store ``(obs, mixture, info["reward_parts_K"], next_obs)``; during warmup also feed the teacher
        ``info["loss_K"]``. Frozen mode stores nothing.

        The stored mixture is the one the env applied, ``info["weights_K"]``, when present (the env
        projects actions itself), else ``weights``. A transition whose reward the env marks invalid
        (``info["reward_valid"]`` false: no Gram matrix, a skipped LM step) or with non-finite values
        is dropped, so the critic never fits placeholder rewards (spec B14).
        """
        obs_S, weights_K, next_obs_S = self._check_transition(obs, weights, next_obs, info)
        rewards_K = None if self.frozen else self._check_vector_info(info, "reward_parts_K")
        if self.in_warmup or self.config.entropy_prior == "teacher":
            self.teacher.observe(obs_S, weights_K, reward, next_obs_S, info)
        with self._data_lock:  # an update on another thread may be sampling the buffer
            if self.in_warmup:
                self.warmup_mixture_sum_K += weights_K
            self.num_decisions += 1
            if rewards_K is None:
                return
            finite = all(np.all(np.isfinite(x)) for x in (obs_S, next_obs_S, rewards_K))
            if not finite or not bool(info.get("reward_valid", True)) or bool(info.get("skipped", False)):
                self.num_skipped += 1
                logger.warning(
                    "ac_odm: dropped transition %d (invalid or non-finite reward/observation)",
                    self.num_decisions,
                )
                return
            self.replay_buffer.add(obs_S, weights_K, rewards_K, next_obs_S)
            self.update_credit += self.config.updates_per_step

    def _check_transition(
        self, obs: np.ndarray, weights: np.ndarray, next_obs: np.ndarray, info: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs_S, next_obs_S = self._check_obs(obs, "obs"), self._check_obs(next_obs, "next_obs")
        weights_K = self._check_weights(info["weights_K"] if "weights_K" in info else weights)
        return obs_S, weights_K, next_obs_S

    # -- split acting: a copy acts (rank 0), this instance learns (the agent actor) -------------------
    def observe_acting(
        self,
        obs: np.ndarray,
        weights: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        info: Mapping[str, Any],
    ) -> None:
        """The acting copy's ``observe``: count the decision and, during warmup, feed the ODM teacher
        (what ``act`` depends on besides the policy); the replay buffer is the learner's alone."""
        obs_S, weights_K, next_obs_S = self._check_transition(obs, weights, next_obs, info)
        if self.in_warmup:
            self.teacher.observe(obs_S, weights_K, reward, next_obs_S, info)
        with self._data_lock:
            self.num_decisions += 1

    def policy_snapshot(self, since_version: int = -1) -> dict[str, Any] | None:
        """The published acting policy: ``{"version": policy_version, "actor": {name: float array}}``,
        copied under the policy lock (never half an update), as numpy arrays so it crosses processes
        without torch pickling; None when ``policy_version <= since_version`` (nothing new to send)."""
        with self._policy_lock, torch.no_grad():
            if self.policy_version <= since_version:
                return None
            actor = {k: v.detach().to("cpu").numpy().copy() for k, v in self._acting.state_dict().items()}
            return {"version": self.policy_version, "actor": actor}

    def load_policy_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """Act from ``snapshot`` (another instance's ``policy_snapshot``): copy it into the back buffer,
        then swap, as an update publishes. ``policy_version`` becomes the snapshot's.

        Raises:
            ValueError: the snapshot's tensors do not match this actor's names and shapes.
        """
        arrays = snapshot["actor"]
        target = self._acting_back.state_dict()
        if set(arrays) != set(target):
            raise ValueError(
                f"policy snapshot has tensors {sorted(arrays)}, this actor has {sorted(target)}"
            )
        with warnings.catch_warnings(), torch.no_grad():
            # Ray hands read-only arrays; they are only read here (copied into our own buffer).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, dst in target.items():
                src = torch.from_numpy(np.asarray(arrays[name]))
                if src.shape != dst.shape:
                    raise ValueError(
                        f"policy snapshot tensor {name!r} has shape {tuple(src.shape)}, "
                        f"this actor's has {tuple(dst.shape)}"
                    )
                dst.copy_(src)
        with self._policy_lock:
            self._acting, self._acting_back = self._acting_back, self._acting
            self.policy_version = int(snapshot["version"])

    def acting_state(self) -> dict[str, Any]:
        """What ``act`` changes: the exploration generator's state and the noise decay's clock."""
        return {"explore_rng": self.explore_rng.bit_generator.state, "num_explore": self.num_explore}

    def load_acting_state(self, state: Mapping[str, Any]) -> None:
        """Take over an acting copy's ``acting_state`` (the learner does, with every transition, so its
        ``state_dict`` is the whole agent's)."""
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.num_explore = int(state["num_explore"])

    def update(self) -> dict[str, float]:
        """Run the gradient updates owed (``updates_per_step`` per stored transition); the mean metrics
        of those updates, or ``{}`` when none ran (frozen mode, or credit below one update). The trained
        actor becomes the acting policy when they are done."""
        with self._data_lock:
            num_steps = 0 if self.frozen else int(self.update_credit)
            self.update_credit -= num_steps
        if num_steps == 0:
            return {}
        runs = [self._train_step() for _ in range(num_steps)]
        self._publish_policy()
        return {key: _mean_finite([m[key] for m in runs]) for key in runs[0]}

    def _train_step(self) -> dict[str, float]:
        """One gradient update (SB3 ``TD3.train``): TD target, critic step, (delayed) actor step, Polyak."""
        cfg = self.config
        # 1. Minibatch drawn by the buffer's own seeded generator (a copy: fancy indexing), under the
        #    lock that observe takes to add a transition from another thread.
        with self._data_lock:
            warmup = self.num_decisions <= self.warmup_steps  # the newest transition is a warmup decision
            batch = self.replay_buffer.sample(cfg.batch_size)
        # 2. End of warmup: hard-copy the online networks into the targets, once.
        if not warmup and not self.targets_synced:
            hard_update(self.actor, self.actor_target)
            hard_update(self.critic, self.critic_target)
            self.targets_synced = True
        obs_BS, weights_BK, rewards_BK, next_obs_BS = (torch.as_tensor(x, device=self.device) for x in batch)
        # 3. Learning rates from each network's schedule (constant during warmup).
        actor_lr = self._set_lr(self.actor_optimizer, cfg.actor_lr, warmup)
        critic_lr = self._set_lr(self.critic_optimizer, cfg.critic_lr, warmup)
        # 4. TD target without gradients; no terminal mask (the task never terminates).
        with torch.no_grad():
            if warmup and cfg.warmup_critic_target == "reference":
                target_q_BK = (1.0 + cfg.gamma) * rewards_BK  # the reference's r + gamma * r (spec B5)
            else:
                # Warmup bootstraps from the online networks: the targets are copied only at its end.
                actor_t, critic_t = (
                    (self.actor, self.critic) if warmup else (self.actor_target, self.critic_target)
                )
                next_logits_BK = actor_t.logits(next_obs_BS)
                # TD3 target policy smoothing, in logit space so the action stays on the simplex.
                if cfg.target_noise > 0 and not warmup:
                    noise_BK = torch.randn(next_logits_BK.shape, generator=self.noise_generator)
                    next_logits_BK = next_logits_BK + cfg.target_noise * noise_BK.to(self.device)
                next_q_CBK = critic_t(next_obs_BS, torch.softmax(next_logits_BK, dim=-1))
                next_q_BK = next_q_CBK.min(dim=0).values  # min over twin critics (TD3); C = 1: the critic
                target_q_BK = rewards_BK + cfg.gamma * next_q_BK
        # 5. Critic step: MSE over the batch and the K heads (mean TD error), summed over critics.
        q_CBK = self.critic(obs_BS, weights_BK)
        critic_loss = torch.stack([F.mse_loss(q_BK, target_q_BK) for q_BK in q_CBK]).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        self.num_updates += 1
        # 6. Actor step with the actor's own optimizer (spec B1). Warmup: behaviour-clone the teacher's
        #    weights (MSE). Then every policy_delay-th update: maximise the sum of the critic's heads.
        actor_loss = None
        kl_to_prior = None
        if warmup:
            actor_loss = F.mse_loss(self.actor(obs_BS), weights_BK)
        elif self.num_main_updates % cfg.policy_delay == 0:
            # Maximum-entropy actor on the simplex: maximise the critic's heads minus
            # alpha * KL(pi(s) || prior), which keeps an interior mixture unless the critic pays for
            # leaving it.
            log_pi_BK = F.log_softmax(self.actor.logits(obs_BS), dim=-1)
            pi_BK = log_pi_BK.exp()
            _set_requires_grad(self._params["critic"], False)  # the actor objective must not touch the critic
            actor_loss = -self.critic.q1(obs_BS, pi_BK).sum(dim=-1).mean()
            _set_requires_grad(self._params["critic"], True)
            kl_to_prior = (pi_BK * (log_pi_BK - self._log_prior_K())).sum(dim=-1).mean()
            if cfg.entropy_coef > 0:
                actor_loss = actor_loss + cfg.entropy_coef * kl_to_prior
        if kl_to_prior is None:  # warm-up or a delayed step: report the policy's distance all the same
            with torch.no_grad():
                log_pi_BK = F.log_softmax(self.actor.logits(obs_BS), dim=-1)
                kl_to_prior = (log_pi_BK.exp() * (log_pi_BK - self._log_prior_K())).sum(dim=-1).mean()
        if actor_loss is not None:
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_optimizer.step()
            # 7. After warmup: Polyak-average both targets toward the online networks (no gradients).
            if not warmup:
                polyak_update(self._params["actor"], self._params["actor_target"], cfg.tau)
                polyak_update(self._params["critic"], self._params["critic_target"], cfg.tau)
        if not warmup:
            self.num_main_updates += 1
        return {
            "agent/critic_loss": critic_loss.item(),
            "agent/actor_loss": math.nan if actor_loss is None else actor_loss.item(),
            "agent/kl_to_prior": kl_to_prior.item(),
            "agent/q_mean": q_CBK[0].mean().item(),
            "agent/target_q_mean": target_q_BK.mean().item(),
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
            **{name: getattr(self, name).state_dict() for name in _MODULES},
            "lr_schedule": {"kind": self.config.lr_schedule, "num_main_updates": self.num_main_updates},
            "replay_buffer": self.replay_buffer.state_dict(),
            "explore_rng": self.explore_rng.bit_generator.state,
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
        for name in _MODULES:
            getattr(self, name).load_state_dict(state[name])
        self.num_main_updates = int(state["lr_schedule"]["num_main_updates"])
        self.replay_buffer.load_state_dict(state["replay_buffer"])
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.noise_generator.set_state(state["noise_generator"])
        for name in _COUNTERS:
            setattr(self, name, type(getattr(self, name))(state["counters"][name]))
        self.teacher.load_state_dict(state["teacher"])
        self.warmup_mixture_sum_K = np.asarray(state["warmup_mixture_sum_K"], dtype=np.float64).copy()
        self._publish_policy()

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
        hard_update(self.actor, self.actor_target)
        hard_update(self.critic, self.critic_target)
        self._publish_policy()


_MODULES = ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer")
_COUNTERS = ("num_decisions", "num_updates", "num_explore", "num_skipped", "update_credit", "targets_synced")


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
        raise ValueError(f"agent.policy = {str(path)!r} is not a readable policy file: {exc}") from exc
    if not isinstance(policy, dict) or policy.get("format") != POLICY_FORMAT:
        raise ValueError(
            f"agent.policy = {str(path)!r} is not an acodm policy file (format {POLICY_FORMAT!r})"
        )
    if policy.get("version") != POLICY_VERSION:
        raise ValueError(f"policy {path} has version {policy.get('version')}, expected {POLICY_VERSION}")
    return policy


def _set_requires_grad(params: list[torch.Tensor], flag: bool) -> None:
    for param in params:
        param.requires_grad_(flag)


def _mean_finite(values: list[float]) -> float:
    """Mean over the finite values (a delayed actor step reports NaN); NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _softmax(logits_K: np.ndarray) -> np.ndarray:
    exp_K = np.exp(logits_K - logits_K.max())
    return exp_K / exp_K.sum()
