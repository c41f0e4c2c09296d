"""The actor and critic networks of AC-ODM, and the target-network updates.

Dimension legend: B = batch, K = domains, S = observation features, C = critics (1, or 2 for TD3).

Both networks are plain fp32 MLPs of ``num_hidden_layers`` blocks ``Linear -> LayerNorm -> ReLU`` of
width ``hidden_width`` followed by a linear head (the reference: 5 blocks of width 1024). The actor's
head is a softmax over the K domains; the critic reads ``[obs, weights]`` and has one Q-value per
domain (one head per reward part), so it learns K value functions at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden_width: int, num_hidden_layers: int) -> nn.Sequential:
    """``num_hidden_layers`` x (Linear, LayerNorm, ReLU), then a Linear head; PyTorch default init."""
    layers: list[nn.Module] = []
    width_in = in_dim
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(width_in, hidden_width), nn.LayerNorm(hidden_width), nn.ReLU()]
        width_in = hidden_width
    layers.append(nn.Linear(width_in, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy: observation (S) -> mixture on the K-simplex (softmax head)."""

    def __init__(self, obs_dim: int, num_domains: int, hidden_width: int, num_hidden_layers: int) -> None:
        super().__init__()
        self.net = mlp(obs_dim, num_domains, hidden_width, num_hidden_layers)

    def logits(self, obs_BS: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-weights ``logits_BK`` (exploration and TD3 smoothing add noise here)."""
        return self.net(obs_BS)

    def forward(self, obs_BS: torch.Tensor) -> torch.Tensor:
        """``weights_BK``, each row on the simplex."""
        return torch.softmax(self.logits(obs_BS), dim=-1)


class Critic(nn.Module):
    """``num_critics`` independent Q-networks, each ``[obs_S, weights_K] -> q_K`` (one value per domain)."""

    def __init__(
        self, obs_dim: int, num_domains: int, hidden_width: int, num_hidden_layers: int, num_critics: int = 1
    ) -> None:
        super().__init__()
        self.q_nets = nn.ModuleList(
            mlp(obs_dim + num_domains, num_domains, hidden_width, num_hidden_layers)
            for _ in range(num_critics)
        )

    def forward(self, obs_BS: torch.Tensor, weights_BK: torch.Tensor) -> torch.Tensor:
        """``q_CBK``: every critic's K Q-values for each (observation, mixture) pair."""
        x_B = torch.cat([obs_BS, weights_BK], dim=-1)
        return torch.stack([q_net(x_B) for q_net in self.q_nets])

    def q1(self, obs_BS: torch.Tensor, weights_BK: torch.Tensor) -> torch.Tensor:
        """``q_BK`` of the first critic only (the actor's objective, as in TD3)."""
        return self.q_nets[0](torch.cat([obs_BS, weights_BK], dim=-1))


def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor], tau: float) -> None:
    """``target <- (1 - tau) * target + tau * online``, in place and without gradients (SB3 ``polyak_update``).

    ``zip(strict=True)`` turns a parameter-count mismatch between the two networks into an error
    instead of a silent partial update.
    """
    with torch.no_grad():
        for param, target_param in zip(params, target_params, strict=True):
            target_param.mul_(1.0 - tau).add_(param, alpha=tau)


def hard_update(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter and buffer of ``source`` into ``target`` (end of warmup)."""
    with torch.no_grad():
        for param, target_param in zip(
            source.state_dict().values(), target.state_dict().values(), strict=True
        ):
            target_param.copy_(param)
