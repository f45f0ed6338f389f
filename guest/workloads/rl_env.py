"""A contextual bandit and the policy that learns it (the RL objectives of ``train``).

Each round shows a context: one of ``clusters`` fixed prototype vectors plus Gaussian noise. Each cluster has one
best action, rewarded 1 with probability 0.9; any other action with probability 0.1. A uniform policy earns
0.1 + 0.8/actions on average (0.3 with 4 actions); the optimum is 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class BanditBatch:
    contexts: torch.Tensor  # (N, dim) float32
    clusters: np.ndarray  # (N,) which prototype each context came from


class ContextualBandit:
    def __init__(self, seed: int, dim: int = 8, clusters: int = 6, actions: int = 4, noise: float = 0.3) -> None:
        layout = np.random.default_rng(seed)  # the environment itself is fixed by the seed ...
        self.prototypes = layout.normal(size=(clusters, dim)).astype(np.float32)
        self.best_action = layout.integers(0, actions, size=clusters)
        self.dim, self.clusters, self.actions, self.noise = dim, clusters, actions, noise
        self.rng = np.random.default_rng(seed + 1)  # ... and this stream is its "data position", checkpointed

    def observe(self, n: int) -> BanditBatch:
        clusters = self.rng.integers(0, self.clusters, size=n)
        contexts = self.prototypes[clusters] + self.noise * self.rng.normal(size=(n, self.dim)).astype(np.float32)
        return BanditBatch(torch.from_numpy(contexts.astype(np.float32)), clusters)

    def reward(self, batch: BanditBatch, actions: torch.Tensor) -> torch.Tensor:
        best = actions.cpu().numpy() == self.best_action[batch.clusters]
        paid = self.rng.random(size=best.shape) < np.where(best, 0.9, 0.1)
        return torch.from_numpy(paid.astype(np.float32))

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class Policy(nn.Module):
    """π(a|s) from an MLP, plus a state-value head V(s) used as REINFORCE's baseline."""

    def __init__(self, dim: int, actions: int, hidden: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.logits = nn.Linear(hidden, actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(contexts)
        return torch.log_softmax(self.logits(features), dim=-1), self.value(features).squeeze(-1)


def reinforce_loss(
    log_probs: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor
) -> torch.Tensor:
    """REINFORCE with a learned baseline: −mean((r − V(s)) · log π(a|s)) + ½·mean((r − V(s))²).

    The advantage uses V(s) detached, so the value loss trains the baseline without biasing the policy gradient.
    """
    chosen = log_probs.gather(1, actions[:, None]).squeeze(1)
    advantage = rewards - values.detach()
    return -(advantage * chosen).mean() + 0.5 * ((rewards - values) ** 2).mean()


def seed_rl_loss(log_probs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The vision document's formula, as written: L_RL = (1/N)·Σ (r_i − π(a_i|s_i))².

    This is a regression of the chosen action's probability onto its reward, not a policy gradient: its gradient
    −2(r − π)·∇π is not the score-function estimator E[r·∇log π], it is biased towards whatever actions were
    sampled, it cannot represent rewards outside [0, 1], and it has no baseline. With 0/1 rewards it still nudges
    rewarded actions up and unrewarded ones down, which is why it can improve reward on this bandit.
    """
    chosen = log_probs.gather(1, actions[:, None]).squeeze(1).exp()
    return ((rewards - chosen) ** 2).mean()
