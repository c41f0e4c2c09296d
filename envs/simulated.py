"""SimulatedBackend: a seeded, millisecond stand-in for LM pretraining with a known best mixture.

Dimension legend: K = domains, D = gradient dimension, L = monitored layers, W = monitored layer width.

It produces full ``TrainSignals`` (per-domain loss, counts, tokens, the Gram matrix of per-domain mean
gradients, monitored weight norms) from an analytic model, for agent development and env tests:

- **Gradient geometry.** In R^D with an orthonormal basis ``u, e_1..e_K`` (drawn from the seed), domain
  i's expected gradient direction is the unit vector ``mu_i = a_i u + sqrt(1 - a_i^2) e_i``, where
  ``a_i`` is its ``alignment`` with the shared direction ``u``. A ``hub`` domain replaces its own
  direction ``e_i`` by the normalised sum of the other target domains' own directions, so it agrees
  with every target domain. A junk domain has ``a_i < 0``: its gradient opposes the others'.
  Expected cosines ``C_ij = mu_i . mu_j`` do not depend on the seed.
- **Per-step gradients.** A domain with ``c_i`` micro-batches this step has mean gradient
  ``g_i = m(t) (mu_i + sigma / sqrt(c_i) xi_i)`` with ``xi_i ~ N(0, I_D / D)`` and one global scale
  ``m(t) = 1 / sqrt(1 + t / 50)`` (shared by all domains, so the expected score ranking stays fixed:
  hub highest, junk lowest). Absent domains have zero rows.
- **Losses.** First-order transfer: training on domain j's gradient moves domain i's loss by
  ``-lr <g_i, g_j>``, so each domain sees effective tokens ``E_i = max(0, D_i + gamma sum_{j != i}
  C_ij D_j)`` (``gamma`` = ``transfer``), where
  ``D_j`` are domain j's tokens discounted for repetition beyond its ``size_tokens``
  (``U + U R* (1 - exp(-(n/U - 1) / R*))``, Muennighoff et al. 2023). Loss
  ``L_i = floor_i + (init_i - floor_i) (1 + E_i / tau)^(-alpha)``; the train loss adds noise
  ``loss_noise / sqrt(c_i)`` and is measured before the step's tokens count; validation is noise-free.
  The default junk domain starts highest and barely falls, and its tokens raise every other loss.
- **Monitored weights.** L vectors ``w_l`` in R^W updated by ``w_l <- (1 - lr wd) w_l - lr R_l g_mix``
  (``R_l`` fixed random maps, ``g_mix`` the micro-batch-weighted mean gradient, warmup + cosine lr),
  so ``weight_norms_L`` and the change norms (since the previous step, or since the start in the
  reference observation mode) are real norms.

A good mixer therefore puts more weight on the hub and less on junk: that raises the reward
``<w, s>`` and lowers the validation perplexity (the known-answer test in ``tests/envs``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from envs.config import StrictModel
from envs.signals import TrainSignals
from envs.validation import validation_metrics


class SimulatedDomain(StrictModel):
    """One simulated domain."""

    name: str = Field(..., min_length=1)
    alignment: float = Field(
        ..., ge=-1, le=1, description="Cosine of its gradient with the shared direction."
    )
    hub: bool = Field(
        False, description="Its own direction is the sum of the other targets' (agrees with all)."
    )
    size_tokens: int = Field(..., gt=0, description="Unique tokens; more are repeated (discounted).")
    init_loss: float = Field(..., gt=0)
    floor_loss: float = Field(..., ge=0)
    target: bool = True

    @model_validator(mode="after")
    def _check(self) -> SimulatedDomain:
        if self.floor_loss >= self.init_loss:
            raise ValueError(
                f"domain {self.name!r}: floor_loss {self.floor_loss} must be < init_loss {self.init_loss}"
            )
        return self


def default_domains() -> list[SimulatedDomain]:
    """Five domains: three ordinary ones, a smaller hub aligned with all, and a junk domain."""
    return [
        SimulatedDomain(name="web", alignment=0.4, size_tokens=8_000_000, init_loss=6.0, floor_loss=3.2),
        SimulatedDomain(name="books", alignment=0.35, size_tokens=6_000_000, init_loss=6.2, floor_loss=3.4),
        SimulatedDomain(name="code", alignment=0.3, size_tokens=4_000_000, init_loss=5.5, floor_loss=2.0),
        SimulatedDomain(
            name="wiki", alignment=0.6, hub=True, size_tokens=3_000_000, init_loss=6.0, floor_loss=3.0
        ),
        SimulatedDomain(
            name="junk", alignment=-0.6, size_tokens=6_000_000, init_loss=9.0, floor_loss=8.6, target=False
        ),
    ]


def complementary_domains() -> list[SimulatedDomain]:
    """Four complementary targets (a little of the shared direction each, their own the rest; no hub) of
    different sizes and losses, and an opposed junk domain: the best mixture is interior (junk at the
    floor, the rest spread over the targets). The known-answer tests and ``benchmarks/agent_sim.py``
    use it."""
    return [
        SimulatedDomain(name="a", alignment=0.3, size_tokens=8_000_000, init_loss=6.0, floor_loss=3.2),
        SimulatedDomain(name="b", alignment=0.3, size_tokens=6_000_000, init_loss=6.2, floor_loss=3.4),
        SimulatedDomain(name="c", alignment=0.25, size_tokens=4_000_000, init_loss=5.5, floor_loss=2.0),
        SimulatedDomain(name="d", alignment=0.35, size_tokens=3_000_000, init_loss=6.0, floor_loss=3.0),
        SimulatedDomain(
            name="junk", alignment=-0.6, size_tokens=6_000_000, init_loss=9.0, floor_loss=8.6, target=False
        ),
    ]


class SimulatedConfig(StrictModel):
    """Parameters of the simulated pretraining run."""

    domains: list[SimulatedDomain] = Field(default_factory=default_domains, min_length=2)
    total_steps: int = Field(200, gt=0)
    microbatches_per_step: int = Field(16, gt=0, description="Global micro-batches per optimiser step.")
    tokens_per_microbatch: int = Field(4096, gt=0)
    min_per_domain: int = Field(1, ge=0, description="Micro-batches forced per domain each step.")
    grad_dim: int = Field(64, gt=0, description="D; must exceed K.")
    grad_noise: float = Field(1.0, ge=0, description="sigma: noise of one micro-batch's gradient.")
    loss_noise: float = Field(0.02, ge=0)
    loss_exponent: float = Field(0.5, gt=0, description="alpha of the per-domain power law.")
    loss_tokens_scale: float = Field(1e6, gt=0, description="tau, effective tokens of the power law.")
    repeat_decay: float = Field(
        4.0, gt=0, description="R*: repetitions after which extra epochs stop helping."
    )
    transfer: float = Field(0.75, ge=0, le=1, description="gamma: weight of other domains' tokens in E_i.")
    num_monitored_layers: int = Field(4, ge=0)
    monitored_width: int = Field(32, gt=0)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_fraction: float = Field(0.02, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> SimulatedConfig:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"simulated domain names must be unique, got {names}")
        if not any(d.target for d in self.domains):
            raise ValueError("at least one simulated domain must be a target")
        if self.grad_dim <= len(self.domains):
            raise ValueError(
                f"grad_dim={self.grad_dim} must exceed the number of domains {len(self.domains)}"
            )
        if self.min_per_domain * len(self.domains) > self.microbatches_per_step:
            raise ValueError(
                f"min_per_domain={self.min_per_domain} x {len(self.domains)} domains exceeds "
                f"microbatches_per_step={self.microbatches_per_step}"
            )
        return self


def largest_remainder_quotas(weights_K: np.ndarray, total: int, minimum: int = 0) -> np.ndarray:
    """Integer quotas summing to ``total``: ``minimum`` each, the rest by largest remainder (ties: lower index)."""
    k = len(weights_K)
    rest = total - minimum * k
    ideal = weights_K / weights_K.sum() * rest
    quotas = np.floor(ideal).astype(np.int64)
    short = rest - int(quotas.sum())
    order = np.lexsort((np.arange(k), -(ideal - quotas)))
    quotas[order[:short]] += 1
    return quotas + minimum


def _lr_multiplier(step: int, total: int, warmup_fraction: float) -> float:
    warmup = max(1, round(warmup_fraction * total)) if warmup_fraction else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class SimulatedBackend:
    """The ``TrainerBackend`` of the analytic model in the module docstring.

    Args:
        config: the simulation parameters (defaults: five domains, 200 steps).
        delta_baseline: ``previous`` (step-to-step weight change) or ``initial`` (since the start).
    """

    def __init__(
        self,
        config: SimulatedConfig | None = None,
        *,
        delta_baseline: Literal["previous", "initial"] = "previous",
    ) -> None:
        self.config = config or SimulatedConfig()
        if delta_baseline not in ("previous", "initial"):
            raise ValueError(f"delta_baseline must be 'previous' or 'initial', got {delta_baseline!r}")
        self.delta_baseline = delta_baseline
        domains = self.config.domains
        self.domain_names = [d.name for d in domains]
        self.target_mask_K = np.array([d.target for d in domains], dtype=bool)
        sizes = np.array([d.size_tokens for d in domains], dtype=np.float64)
        self.natural_weights_K = sizes / sizes.sum()
        self.total_steps = self.config.total_steps
        self.num_monitored_layers = self.config.num_monitored_layers
        self._alignment_K = np.array([d.alignment for d in domains])
        self._init_K = np.array([d.init_loss for d in domains])
        self._floor_K = np.array([d.floor_loss for d in domains])
        self._size_K = sizes
        self._seed: int | None = None

    @property
    def num_domains(self) -> int:
        """K."""
        return len(self.domain_names)

    # ------------------------------------------------------------------ geometry and losses
    def _build(self, seed: int) -> None:
        cfg, k = self.config, self.num_domains
        # The third stream (micro-batch spread) is spawned after the first two, so adding it left the
        # geometry and noise streams of a seed unchanged.
        geometry_seq, noise_seq, spread_seq = np.random.SeedSequence(seed).spawn(3)
        geo = np.random.default_rng(geometry_seq)
        basis_DD, _ = np.linalg.qr(geo.standard_normal((cfg.grad_dim, cfg.grad_dim)))
        shared_D, own_KD = basis_DD[:, 0], basis_DD[:, 1 : k + 1].T.copy()
        hubs = [i for i, d in enumerate(cfg.domains) if d.hub]
        for h in hubs:
            others = [j for j in range(k) if cfg.domains[j].target and j not in hubs]
            if others:
                combined = own_KD[others].sum(axis=0)
                own_KD[h] = combined / np.linalg.norm(combined)
        a = self._alignment_K[:, None]
        self._mu_KD = a * shared_D[None, :] + np.sqrt(1.0 - a**2) * own_KD
        self.cosine_KK = self._mu_KD @ self._mu_KD.T
        L, W = cfg.num_monitored_layers, cfg.monitored_width
        self._proj_LWD = geo.standard_normal((L, W, cfg.grad_dim)) / math.sqrt(cfg.grad_dim)
        self._weights_LW = geo.standard_normal((L, W)) * (1.0 + np.arange(L)[:, None] / max(L, 1))
        self._initial_LW = self._weights_LW.copy()
        self._rng = np.random.default_rng(noise_seq)
        self._spread_rng = np.random.default_rng(spread_seq)

    def _effective_tokens(self, seen_K: np.ndarray) -> np.ndarray:
        u, r_star = self._size_K, self.config.repeat_decay
        extra = np.maximum(seen_K / u - 1.0, 0.0)
        discounted = np.where(seen_K <= u, seen_K, u + u * r_star * (1.0 - np.exp(-extra / r_star)))
        cross_KK = self.config.transfer * (self.cosine_KK - np.eye(self.num_domains))
        return np.maximum(discounted + cross_KK @ discounted, 0.0)

    def expected_loss(self, seen_K: np.ndarray | None = None) -> np.ndarray:
        """Noise-free per-domain loss after ``seen_K`` tokens per domain (default: the tokens seen so far)."""
        self._require_reset()
        seen = self._seen_K if seen_K is None else np.asarray(seen_K, dtype=np.float64)
        cfg = self.config
        scale = (1.0 + self._effective_tokens(seen) / cfg.loss_tokens_scale) ** (-cfg.loss_exponent)
        return self._floor_K + (self._init_K - self._floor_K) * scale

    def _require_reset(self) -> None:
        if self._seed is None:
            raise RuntimeError("SimulatedBackend: call reset(seed) before step/evaluate/state_dict")

    # ------------------------------------------------------------------ TrainerBackend
    def reset(self, seed: int) -> TrainSignals:
        """Start a fresh run from ``seed``; returns the step-0 record (no losses measured yet)."""
        self._seed = int(seed)
        self._build(self._seed)
        self._seen_K = np.zeros(self.num_domains)
        self.step_count = 0
        k = self.num_domains
        return TrainSignals(
            step=0,
            weights_K=self.natural_weights_K.copy(),
            loss_K=np.full(k, np.nan),
            microbatches_K=np.zeros(k, dtype=np.int64),
            tokens_K=np.zeros(k, dtype=np.int64),
            loss=float("nan"),
            lr=self.config.lr * _lr_multiplier(0, self.total_steps, self.config.warmup_fraction),
            grad_norm=float("nan"),
            weight_norms_L=np.linalg.norm(self._weights_LW, axis=1),
            weight_delta_norms_L=np.zeros(self.num_monitored_layers),
        )

    def step(self, weights_K: np.ndarray) -> TrainSignals:
        """One simulated optimiser step on the mixture ``weights_K``."""
        self._require_reset()
        cfg, k = self.config, self.num_domains
        weights = np.asarray(weights_K, dtype=np.float64)
        if (
            weights.shape != (k,)
            or not np.all(np.isfinite(weights))
            or weights.min() < 0
            or weights.sum() <= 0
        ):
            raise ValueError(
                f"weights_K must be {k} finite non-negative numbers with a positive sum, got {weights}"
            )
        weights = weights / weights.sum()
        counts = largest_remainder_quotas(weights, cfg.microbatches_per_step, cfg.min_per_domain)
        present = counts > 0
        tokens = counts * cfg.tokens_per_microbatch
        rng = self._rng

        expected = self.expected_loss()
        noise = rng.standard_normal(k) * cfg.loss_noise / np.sqrt(np.maximum(counts, 1))
        loss_K = np.where(present, expected + noise, np.nan)

        scale = 1.0 / math.sqrt(1.0 + self.step_count / 50.0)
        xi_KD = rng.standard_normal((k, cfg.grad_dim)) / math.sqrt(cfg.grad_dim)
        grads_KD = scale * (self._mu_KD + cfg.grad_noise / np.sqrt(np.maximum(counts, 1))[:, None] * xi_KD)
        grads_KD[~present] = 0.0
        # Sum of the c_i micro-batches' squared norms: c_i ||g_i||^2 plus their spread around the mean,
        # scale^2 sigma^2 chi^2_{(c_i - 1) D} / D (each micro-batch is scale (mu_i + sigma xi_m)).
        spread_K = self._spread_rng.chisquare(np.maximum(counts - 1, 0) * cfg.grad_dim + (counts <= 1))
        spread_K = np.where(counts > 1, spread_K, 0.0) * (scale * cfg.grad_noise) ** 2 / cfg.grad_dim
        sqnorm_K = counts * np.einsum("kd,kd->k", grads_KD, grads_KD) + spread_K
        mixed_D = (counts[:, None] * grads_KD).sum(axis=0) / counts.sum()

        lr = cfg.lr * _lr_multiplier(self.step_count, self.total_steps, cfg.warmup_fraction)
        before_LW = self._weights_LW.copy()
        update_LW = np.einsum("lwd,d->lw", self._proj_LWD, mixed_D)
        update_LW += 0.1 * scale * rng.standard_normal(update_LW.shape)
        self._weights_LW = (1.0 - lr * cfg.weight_decay) * self._weights_LW - lr * update_LW
        baseline = self._initial_LW if self.delta_baseline == "initial" else before_LW

        self._seen_K = self._seen_K + tokens
        self.step_count += 1
        return TrainSignals(
            step=self.step_count,
            weights_K=weights,
            loss_K=loss_K,
            microbatches_K=counts.astype(np.int64),
            tokens_K=tokens.astype(np.int64),
            loss=float(np.nansum(loss_K * tokens) / tokens.sum()),
            lr=float(lr),
            grad_norm=float(np.linalg.norm(mixed_D)),
            gram_KK=grads_KD @ grads_KD.T,
            microbatch_sqnorm_K=sqnorm_K,
            weight_norms_L=np.linalg.norm(self._weights_LW, axis=1),
            weight_delta_norms_L=np.linalg.norm(self._weights_LW - baseline, axis=1),
        )

    def evaluate(self) -> dict[str, float]:
        """Noise-free validation: ``val/loss|ppl/<domain>`` and the target summaries (as ``Pretrainer``)."""
        loss_K = self.expected_loss()
        # equal validation tokens per domain: weighted_ppl is the geometric mean
        return validation_metrics(self.domain_names, loss_K, np.ones_like(loss_K), self.target_mask_K)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, ints, the noise generator's state) for exact resume."""
        self._require_reset()
        return {
            "seed": self._seed,
            "step": self.step_count,
            "seen_K": self._seen_K.tolist(),
            "weights_LW": self._weights_LW.tolist(),
            "rng": self._rng.bit_generator.state,
            "spread_rng": self._spread_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (the geometry is rebuilt from the seed)."""
        self._seed = int(state["seed"])
        self._build(self._seed)
        self.step_count = int(state["step"])
        self._seen_K = np.asarray(state["seen_K"], dtype=np.float64)
        if self._seen_K.shape != (self.num_domains,):
            raise ValueError(
                f"simulated state has {self._seen_K.shape} domain counts, expected ({self.num_domains},)"
            )
        self._weights_LW = np.asarray(state["weights_LW"], dtype=np.float64).reshape(self._weights_LW.shape)
        self._rng.bit_generator.state = state["rng"]
        if "spread_rng" in state:  # states written before the micro-batch spread existed lack it
            self._spread_rng.bit_generator.state = state["spread_rng"]

    def close(self) -> None:
        """Nothing to free."""
