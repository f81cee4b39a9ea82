"""``reward_head=mean_pool``: a linear score at every token, averaged over the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.plugins.reward_heads.last_token import linear_scorer
from rlhfkit.rlhf.masked import masked_mean
from rlhfkit.settings import bounded


@dataclass
class MeanPoolConfig:
    init_std: float = bounded(0.0, ge=0)
    """Std of the initial weights (0: zeros, so every sequence starts at reward 0)."""


class MeanPoolHead(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: MeanPoolConfig):
        super().__init__()
        self.linear = linear_scorer(hidden_size, cfg.init_std)

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)  # (B, T)

    def pool(self, token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(token_scores, attention_mask.to(token_scores.dtype), dim=-1)  # (B,)


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("mean_pool", lambda cfg: (lambda hidden: MeanPoolHead(hidden, cfg)), MeanPoolConfig)
