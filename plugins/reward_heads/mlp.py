"""``reward_head=mlp``: a two-layer MLP on the last (EOS) token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.reward_heads.last_token import gather_last
from rlhfkit.settings import bounded, one_of

ACTIVATIONS = {"gelu": torch.nn.GELU, "tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


@dataclass
class MLPConfig:
    width: int = bounded(0, ge=0)
    """Hidden width of the MLP (0: the backbone's hidden size)."""
    activation: str = one_of(*ACTIVATIONS)
    """gelu, tanh or relu."""


class MLPHead(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: MLPConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ConfigError(f"reward_head.activation={cfg.activation!r}: choose one of {sorted(ACTIVATIONS)}.")
        width = cfg.width or hidden_size
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, width), ACTIVATIONS[cfg.activation](), torch.nn.Linear(width, 1))
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)

    def pool(self, token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return gather_last(token_scores, attention_mask)


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("mlp", lambda cfg: (lambda hidden: MLPHead(hidden, cfg)), MLPConfig)
