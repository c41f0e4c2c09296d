"""Backends behind ``DataMixingEnv``: the ``TrainerBackend`` protocol and ``LMBackend`` (the real LM).

Dimension legend: K = domains, L = monitored layers.

A backend owns one training run: ``reset(seed)`` starts it afresh and returns a step-0
``TrainSignals`` record (no losses yet, the initial monitored weight norms), ``step(weights_K)`` runs
one optimiser step on a mixture and returns its signals, ``evaluate()`` runs validation. The
``SimulatedBackend`` (``envs.simulated``) implements the same protocol in milliseconds.

``LMBackend`` wraps the ``Pretrainer`` and a ``GradientProbe``. It runs in one process, or as one
rank of a DDP group (``torch.distributed`` initialised by the caller, e.g. a Ray Train worker): then
every rank builds the same env, calls ``reset`` with the same seed and ``step`` with the same weights
(rank 0 talks to the agent and broadcasts the action; the driver's job), and every rank gets the same
``TrainSignals`` because the Pretrainer and the probe all-reduce inside. Torch, transformers and the
Pretrainer are imported lazily so that importing the env stays light.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Protocol, runtime_checkable

import numpy as np

from envs.config import PretrainConfig
from envs.signals import TrainSignals

log = logging.getLogger(__name__)


@runtime_checkable
class TrainerBackend(Protocol):
    """What ``DataMixingEnv`` needs from a training run (see the module docstring)."""

    domain_names: list[str]
    target_mask_K: np.ndarray
    natural_weights_K: np.ndarray
    total_steps: int
    num_monitored_layers: int

    def reset(self, seed: int) -> TrainSignals:
        """Start a fresh run; return the step-0 record."""
        ...

    def step(self, weights_K: np.ndarray) -> TrainSignals:
        """One optimiser step on the mixture ``weights_K`` (on the simplex)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Validation metrics: ``val/loss/<d>``, ``val/ppl/<d>``, ``val/mean_ppl``, ..."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output."""
        ...

    def close(self) -> None:
        """Free the run's resources (the model, its optimiser)."""
        ...


def initial_signals(
    weights_K: np.ndarray, *, lr: float, weight_norms_L: np.ndarray | None, num_layers: int
) -> TrainSignals:
    """The step-0 record a backend returns from ``reset``: nothing measured yet except weight norms."""
    k = len(weights_K)
    return TrainSignals(
        step=0,
        weights_K=np.asarray(weights_K, dtype=np.float64).copy(),
        loss_K=np.full(k, np.nan),
        microbatches_K=np.zeros(k, dtype=np.int64),
        tokens_K=np.zeros(k, dtype=np.int64),
        loss=float("nan"),
        lr=float(lr),
        grad_norm=float("nan"),
        weight_norms_L=weight_norms_L,
        weight_delta_norms_L=np.zeros(num_layers),
    )


class LMBackend:
    """The real backend: a ``Pretrainer`` (GPT-NeoX on a prepared corpus) plus a ``GradientProbe``.

    Args:
        config: a ``PretrainConfig`` (``data``, ``lm``, ``optim``, ``sampler``, ``eval``, ``train``
            and ``env.probe`` are used).
        corpus: an open ``PreparedCorpus``; default ``PreparedCorpus.open(config.data.prepared_dir)``.
        device: the training device; None = CUDA when available, else CPU.
        delta_baseline: the probe's weight-change baseline (``initial`` for the reference observation).
        process_group: the probe's all-reduce group (default: the default group when initialised).

    Raises:
        ValueError: the prepared corpus's domains differ from ``config.data`` (from ``PreparedCorpus``).
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        corpus: Any = None,
        device: Any = None,
        delta_baseline: str = "previous",
        process_group: Any = None,
    ) -> None:
        from envs.model import model_config

        self.config = config
        if corpus is None:
            from envs.data import PreparedCorpus

            corpus = PreparedCorpus.open(config.data.prepared_dir, expected_domains=config.data.domain_names)
        elif list(corpus.domain_names) != list(config.data.domain_names):
            raise ValueError(
                f"corpus domains {list(corpus.domain_names)} differ from data.domains {config.data.domain_names}"
            )
        self.corpus = corpus
        self.device = device
        self.delta_baseline = delta_baseline
        self.process_group = process_group
        self.domain_names = list(config.data.domain_names)
        self.target_mask_K = np.array([d.target for d in config.data.domains], dtype=bool)
        tokens_K = np.array(
            [corpus.num_tokens(k, "train") for k in range(len(self.domain_names))], dtype=np.float64
        )
        if tokens_K.sum() <= 0:
            raise ValueError(f"prepared corpus at {config.data.prepared_dir!r} has no training tokens")
        self.natural_weights_K = tokens_K / tokens_K.sum()
        self.total_steps = int(config.train.total_steps)
        num_blocks = model_config(config.lm, corpus.vocab_size).num_hidden_layers
        self.num_monitored_layers = min(config.env.probe.num_monitored_layers, num_blocks)
        self.pretrainer: Any = None
        self.probe: Any = None
        self._seed: int | None = None

    def reset(self, seed: int) -> TrainSignals:
        """Build a fresh model, optimiser, sampler and probe from ``seed`` (collective under DDP)."""
        from envs.pretrainer import Pretrainer
        from envs.probe import GradientProbe

        self.close()
        cfg = self.config
        trainer_seed, probe_seed = (int(x) for x in np.random.SeedSequence(int(seed)).generate_state(2))
        self.pretrainer = Pretrainer(
            cfg.lm,
            cfg.optim,
            cfg.sampler,
            cfg.eval,
            self.corpus,
            total_steps=self.total_steps,
            seed=trainer_seed,
            device=self.device,
            target_mask_K=self.target_mask_K,
        )
        self.probe = GradientProbe(
            self.pretrainer.model,
            cfg.env.probe,
            len(self.domain_names),
            seed=probe_seed,
            delta_baseline=self.delta_baseline,  # type: ignore[arg-type]
            process_group=self.process_group,
        )
        if self.probe.num_monitored_layers != self.num_monitored_layers:
            raise RuntimeError(
                f"probe monitors {self.probe.num_monitored_layers} layers, expected {self.num_monitored_layers}"
            )
        self.pretrainer.set_observer(self.probe)
        self._seed = int(seed)
        lr = float(self.pretrainer.optimizer.param_groups[0]["lr"])
        return initial_signals(
            self.natural_weights_K,
            lr=lr,
            weight_norms_L=self.probe.weight_norms(),
            num_layers=self.num_monitored_layers,
        )

    def _require_reset(self) -> None:
        if self.pretrainer is None:
            raise RuntimeError(
                "LMBackend: call reset(seed) (or load_state_dict) before step/evaluate/state_dict"
            )

    def step(self, weights_K: np.ndarray) -> TrainSignals:
        """One optimiser step of the LM on ``weights_K``."""
        self._require_reset()
        return self.pretrainer.train_step(weights_K)

    def evaluate(self) -> dict[str, float]:
        """Per-domain validation (``Pretrainer.evaluate``)."""
        self._require_reset()
        return self.pretrainer.evaluate()

    @property
    def step_count(self) -> int:
        """Optimiser steps done in this run."""
        return 0 if self.pretrainer is None else int(self.pretrainer.step)

    def state_dict(self) -> dict[str, Any]:
        """The seed, the Pretrainer's state and the probe's state (tensors and plain values only)."""
        self._require_reset()
        return {
            "seed": self._seed,
            "pretrainer": self.pretrainer.state_dict(),
            "probe": self.probe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild from the saved seed, then load the model (first) and the probe."""
        seed = int(state["seed"])
        if self.pretrainer is None or self._seed != seed:
            self.reset(seed)
        self.pretrainer.load_state_dict(state["pretrainer"])
        self.probe.load_state_dict(state["probe"])

    def close(self) -> None:
        """Detach the probe and free the model and optimiser (and cached GPU memory)."""
        if self.probe is not None:
            self.probe.close()
        if self.pretrainer is not None:
            self.pretrainer.set_observer(None)
        was_built = self.pretrainer is not None
        self.probe = None
        self.pretrainer = None
        self._seed = None
        if was_built:
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
