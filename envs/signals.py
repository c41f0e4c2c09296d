"""The typed record one optimiser step returns, and the hook protocol the step calls.

Dimension legend: K = domains, L = monitored layers.

``TrainSignals`` is the contract between the trainer (``envs.pretrainer.Pretrainer`` or
``envs.simulated.SimulatedBackend``) and everything downstream: the observation and reward maths
(``envs.observation``, ``envs.rewards``), the ledger and the metrics. It holds plain numpy arrays and
floats, already reduced across data-parallel ranks, so it is identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TrainSignals:
    """What one optimiser step of the LM measured (global over all ranks).

    Attributes:
        step: optimiser steps completed, this one included (1 after the first step).
        weights_K: the mixture the step was sampled with.
        loss_K: mean token loss per domain over this step's micro-batches; NaN where a domain had none.
        microbatches_K: micro-batches per domain in this step (global).
        tokens_K: tokens per domain in this step (global).
        loss: mean token loss over the whole step.
        lr: learning rate used by this step.
        grad_norm: global gradient norm before clipping (NaN if the step was skipped).
        skipped: the step had a non-finite loss or gradient and the update was not applied.
        gram_KK: Gram matrix of the per-domain *mean* gradients of the probed parameters
            (``G @ G.T``); None when no probe is attached. Rows/cols of absent domains are 0.
        microbatch_sqnorm_K: per domain, the sum over its micro-batches of each micro-batch's squared
            gradient norm (same parameters and scale as ``gram_KK``); with the counts it gives an
            unbiased Gram diagonal (``envs.rewards.debiased_gram``). None when not measured.
        weight_norms_L: Frobenius norms of the monitored weight matrices after the update.
        weight_delta_norms_L: Frobenius norms of (weights after - weights before) this step.
        timings: seconds spent per phase (``data``, ``forward_backward``, ``optimizer``, ``probe``, ``step``).
    """

    step: int
    weights_K: np.ndarray
    loss_K: np.ndarray
    microbatches_K: np.ndarray
    tokens_K: np.ndarray
    loss: float
    lr: float
    grad_norm: float
    skipped: bool = False
    gram_KK: np.ndarray | None = None
    microbatch_sqnorm_K: np.ndarray | None = None
    weight_norms_L: np.ndarray | None = None
    weight_delta_norms_L: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        """K."""
        return int(self.weights_K.shape[0])

    @property
    def tokens(self) -> int:
        """Tokens trained on in this step (global)."""
        return int(self.tokens_K.sum())


class StepObserver(Protocol):
    """Hooks a ``Pretrainer`` calls around each micro-batch (the ``GradientProbe`` implements this).

    Call order within one optimiser step::

        begin_step()
        for each micro-batch: begin_microbatch(domain); forward; backward; end_microbatch()
        end_step() -> dict   # after the last backward, before the optimiser step; all-reduces inside
        after_update() -> dict  # after the optimiser step (e.g. weight norms)
    """

    def begin_step(self) -> None:
        """Reset per-step accumulators."""

    def begin_microbatch(self, domain: int) -> None:
        """The next backward pass belongs to ``domain`` (index into the domain list)."""

    def end_microbatch(self) -> None:
        """The backward pass of the current micro-batch has finished."""

    def end_step(self, microbatches_K: np.ndarray) -> dict[str, np.ndarray]:
        """Reduce across ranks and return step statistics (e.g. ``{"gram_KK": ...}``)."""
        ...

    def after_update(self) -> dict[str, np.ndarray]:
        """Statistics read after the optimiser step (e.g. ``{"weight_norms_L": ...}``)."""
        ...
