"""``reward_head=max_pool``: the maximum of per-token linear scores over the sequence."""

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl


@dataclass
class MaxPoolConfig:
    temperature: float = 0.0
    """0: hard max; > 0: a smooth max (temperature * logsumexp(scores / temperature))."""


class MaxPoolHead(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: MaxPoolConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = torch.nn.Linear(hidden_size, 1)

    def token_scores(self, hidden):
        return self.linear(hidden).squeeze(-1)

    def pool(self, token_scores, attention_mask):
        masked = token_scores.masked_fill(attention_mask == 0, float("-inf"))
        if self.cfg.temperature > 0:
            return self.cfg.temperature * torch.logsumexp(masked / self.cfg.temperature, dim=-1)
        return masked.max(-1).values


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("max_pool", lambda cfg: (lambda hidden: MaxPoolHead(hidden, cfg)), MaxPoolConfig)
