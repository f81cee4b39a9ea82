"""Pure functions shared by the RL algorithms (and by third-party ones): logprobs, masked
statistics, GAE, the KL penalty and KL controllers. Shapes are in the comments."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from rlhfkit.errors import ConfigError


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T): log pi(token) at ``temperature`` (the same one used to
    sample, per the "N+ implementation details")."""
    logits = logits.float() / temperature
    # gather - logsumexp: no (B, T, V) log-softmax tensor is kept for the backward pass
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over valid positions. ``denom`` replaces the local count: under data
    parallelism pass :func:`dp_denominator` so that averaging gradients over ranks gives the
    mean over every rank's tokens, exactly as one process would."""
    if dim is None:
        return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def dp_denominator(count: torch.Tensor | float, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None, world_size: int) -> torch.Tensor:
    """global count / world size: the per-rank denominator that makes the rank-average of
    per-rank losses (what DDP and ZeRO average) equal the global mean."""
    count = torch.as_tensor(count, dtype=torch.float32)
    if all_reduce_sum is None or world_size == 1:
        return count.clamp(min=1)
    return (all_reduce_sum(count.clone()) / world_size).clamp(min=1e-8)


def minibatch_size(prompts: int, world_size: int, num_minibatches: int) -> int:
    """Prompts per minibatch on each rank: the step's ``prompts`` split evenly over the
    ranks, each share cut into ``num_minibatches`` equal minibatches. Anything uneven raises,
    alike on every rank: ranks running different numbers of optimizer steps would hang under
    data parallelism, and leftover rollouts would be dropped. Runs check this up front
    (:meth:`rlhfkit.config.RunInfo.check_minibatches`)."""
    unit = world_size * num_minibatches
    if prompts % unit:
        raise ConfigError(
            f"rl.prompts_per_step={prompts}: must be a multiple of {unit} (world size {world_size} x "
            f"algorithm.num_minibatches={num_minibatches}), so that every rank runs the same optimizer steps on "
            f"equal minibatches and no rollout is dropped")
    return prompts // unit


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise to unit variance over the valid positions (and zero mean if
    ``shift_mean``). Invalid positions come back as 0. With ``all_reduce_sum``, the
    statistics are over every rank's positions (the whole global batch)."""
    if all_reduce_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = all_reduce_sum(mask.sum().float())
        mean = all_reduce_sum((x * mask).sum().float()) / n.clamp(min=1)
        var = all_reduce_sum((((x - mean) ** 2) * mask).sum().float()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    rewards, values, mask: (B, T) over response tokens; a position past the end (mask 0)
    has no value, so bootstrapping stops there. Returns (advantages, returns), both (B, T),
    with ``returns = advantages + values``.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, T): the k1 estimator log pi(y_t) - log pi_SFT(y_t) of the sampled tokens."""
    return logprobs - ref_logprobs


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT eq. 2, per token (Ziegler et al. 2019): each token pays
    ``-kl_coef * (log pi - log pi_SFT)`` and the last valid token also receives the
    sequence score. scores: (B,); the rest (B, T). Returns (rewards, kl), both (B, T)."""
    kl = per_token_kl(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # (B, T) one-hot
    rewards = rewards + last.to(rewards.dtype) * scores.unsqueeze(-1)
    return rewards, kl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
    denom: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (the "N+ details" #9): max of the squared errors of the new
    value and of the old value moved at most ``clip``. Returns (loss, clip fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask, denom=denom)
    return loss, masked_mean((loss2 > loss1).float(), mask)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
    denom: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO eq. 7 (clipped surrogate), negated as a loss. With ratio = 1 it equals
    ``-mean(advantages)``."""
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(loss1, loss2), mask, denom=denom)
    stats = {
        "ratio": masked_mean(ratio, mask),
        "clipfrac": masked_mean((loss2 > loss1).float(), mask),
        # Schulman's k3 estimator of KL(old || new): low variance, always >= 0
        "approx_kl": masked_mean((ratio - 1) - (logprobs - old_logprobs), mask),
    }
    return loss, stats


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: move the coefficient towards hitting ``target`` KL,
    proportionally, with the error clipped to +/-20%, over a horizon of ``horizon``
    samples: ``beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def kl_controller(kl_coef: float, adaptive: bool, target: float, horizon: int) -> FixedKLController | AdaptiveKLController:
    """The fixed or adaptive KL controller an algorithm's config asks for."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
