"""The KL penalty to the reference policy and the fixed and adaptive KL controllers."""

from __future__ import annotations

import torch


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


def kl_controller(kl_coef: float, adaptive: bool, target: float, horizon: int) -> FixedKLController | AdaptiveKLController:
    """The fixed or adaptive KL controller an algorithm's config asks for."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
