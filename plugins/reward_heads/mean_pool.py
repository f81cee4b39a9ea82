"""``reward_head=mean_pool``: a linear score at every token, averaged over the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.rl import masked_mean


@dataclass
class MeanPoolConfig:
    init_std: float = 0.0
    """Std of the initial weights (0: zeros, so every sequence starts at reward 0)."""


class MeanPoolHead(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: MeanPoolConfig):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=cfg.init_std) if cfg.init_std > 0 else torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)  # (B, T)

    def pool(self, token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(token_scores, attention_mask.to(token_scores.dtype), dim=-1)  # (B,)


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("mean_pool", lambda cfg: (lambda hidden: MeanPoolHead(hidden, cfg)), MeanPoolConfig)
