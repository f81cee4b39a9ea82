"""``reward_head=last_token``: a linear head on the last (EOS) token, as in InstructGPT."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.settings import bounded


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): index of the last attended position (works with left padding too)."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (idx * attention_mask.long()).argmax(-1)


def gather_last(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return token_scores.gather(-1, last_index(attention_mask)[:, None]).squeeze(-1)


@dataclass
class LastTokenConfig:
    init_std: float = bounded(0.0, ge=0)
    """Std of the initial weights (0: zeros, so every sequence starts at reward 0)."""


def linear_scorer(hidden_size: int, init_std: float) -> torch.nn.Linear:
    """hidden -> one score per position; zero-initialised unless ``init_std`` > 0."""
    linear = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.normal_(linear.weight, std=init_std) if init_std > 0 else torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    return linear


class LastTokenHead(torch.nn.Module):
    def __init__(self, hidden_size: int, cfg: LastTokenConfig):
        super().__init__()
        self.linear = linear_scorer(hidden_size, cfg.init_std)

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)  # (B, T)

    def pool(self, token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return gather_last(token_scores, attention_mask)  # (B,)


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("last_token", lambda cfg: (lambda hidden: LastTokenHead(hidden, cfg)), LastTokenConfig)
