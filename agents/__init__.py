"""Data-mixing agents: AC-ODM (actor-critic), ODM bandits and static mixers behind one ``Mixer`` protocol.

Pure torch/numpy: no Ray, no MLflow, no ``envs`` internals (agents see arrays and gymnasium spaces).
"""

from agents.ac_odm import ActorCriticMixer, read_policy
from agents.base import (
    BaseMixer,
    Mixer,
    Transition,
    build_mixer,
    mixer_kinds,
    project_to_simplex,
    register_mixer,
)
from agents.config import AgentConfig, ExplorationConfig
from agents.greedy import GreedyMixer, MirrorDescentMixer
from agents.networks import Actor, Critic, polyak_update
from agents.odm import Exp3Mixer, SmoothedMeanMixer
from agents.replay import ReplayBatch, ReplayBuffer
from agents.static import StaticMixer

__all__ = [
    "Actor",
    "ActorCriticMixer",
    "AgentConfig",
    "BaseMixer",
    "Critic",
    "Exp3Mixer",
    "ExplorationConfig",
    "GreedyMixer",
    "MirrorDescentMixer",
    "Mixer",
    "ReplayBatch",
    "ReplayBuffer",
    "SmoothedMeanMixer",
    "StaticMixer",
    "Transition",
    "build_mixer",
    "mixer_kinds",
    "polyak_update",
    "project_to_simplex",
    "read_policy",
    "register_mixer",
]
