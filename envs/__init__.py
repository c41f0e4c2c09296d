"""acodm environment side: corpus, sampler, LM trainer, gradient probe, and ``DataMixingEnv``.

Importing ``envs`` registers the Gymnasium id ``acodm/DataMixing-v0`` (a string entry point, so
nothing heavy is imported) and hands on the public names lazily: ``from envs import DataMixingEnv``
imports only what that name needs; torch and transformers load with the LM pieces. Outside Python
code that imported ``envs``, ``gymnasium.make("envs:acodm/DataMixing-v0")`` imports it first.
"""

from __future__ import annotations

import importlib
from typing import Any

from gymnasium.envs.registration import register, registry

ENV_ID = "acodm/DataMixing-v0"  # also registered (idempotently) by envs.env, which defines the same id

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.env:DataMixingEnv")

_EXPORTS = {
    "DataMixingEnv": "envs.env",
    "project_action": "envs.env",
    "StepSignals": "envs.env",
    "TrainerBackend": "envs.backends",
    "LMBackend": "envs.backends",
    "SimulatedBackend": "envs.simulated",
    "SimulatedConfig": "envs.simulated",
    "SimulatedDomain": "envs.simulated",
    "GradientProbe": "envs.probe",
    "CountSketch": "envs.probe",
    "ObservationState": "envs.observation",
    "build_observation": "envs.observation",
    "observation_size": "envs.observation",
    "RewardResult": "envs.rewards",
    "alignment_scores": "envs.rewards",
    "compute_reward": "envs.rewards",
    "TrainSignals": "envs.signals",
    "StepObserver": "envs.signals",
    "Pretrainer": "envs.pretrainer",
    "PreparedCorpus": "envs.data",
    "DomainSampler": "envs.sampler",
}

__all__ = ["ENV_ID", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'envs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
