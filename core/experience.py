"""Rollout + scoring shared by the RL algorithms: sample responses, then score them with
the policy (old logprobs), the frozen SFT reference, the reward model and (optionally) a
critic. Algorithms turn an :class:`Experience` into losses their own way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlhfkit.interfaces import Backend, RLContext
from rlhfkit.rl import logprobs_from_logits
from rlhfkit.sequences import Rollout, draw_uniforms, response_logits, sample


@dataclass
class Experience:
    rollout: Rollout
    logprobs: torch.Tensor  # (B, R) policy, at the rollout temperature
    ref_logprobs: torch.Tensor  # (B, R) frozen SFT policy
    rm_scores: torch.Tensor  # (B,) reward model
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    values: torch.Tensor | None  # (B, R) critic, or None for critic-free algorithms
    mask: torch.Tensor  # (B, R) float: response tokens up to and including EOS

    def select(self, idx: torch.Tensor) -> "Experience":
        r = self.rollout
        sub = Rollout(
            input_ids=r.input_ids[idx], attention_mask=r.attention_mask[idx], prompt_width=r.prompt_width,
            response_mask=r.response_mask[idx], logprobs=r.logprobs[idx], ended=r.ended[idx],
            responses=[r.responses[i] for i in idx.tolist()],
        )
        return Experience(
            sub, self.logprobs[idx], self.ref_logprobs[idx], self.rm_scores[idx], self.scores[idx],
            None if self.values is None else self.values[idx], self.mask[idx],
        )


def policy_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(B, R) log pi(y_t | x, y_<t) of the sampled tokens."""
    return logprobs_from_logits(response_logits(model, rollout), rollout.response_ids, temperature)


def critic_values(critic: Callable[..., torch.Tensor], rollout: Rollout) -> torch.Tensor:
    """(B, R): V(x, y_<t), read at the position before each response token. ``critic`` is
    a reward model or the engine wrapping one."""
    values = critic(rollout.input_ids, rollout.attention_mask, per_token=True)  # (B, P + R)
    P, R = rollout.prompt_width, rollout.response_mask.shape[1]
    return values[:, P - 1 : P + R - 1]


def any_alive_fn(backend: Backend) -> Callable[[bool], bool] | None:
    """For :func:`rlhfkit.sequences.sample`: keep every rank decoding while any rank is,
    so sharded (ZeRO-3) forward passes stay in step. None on one process."""
    if backend.world_size == 1:
        return None
    return lambda alive: bool(backend.all_reduce_sum(torch.tensor(float(alive), device=backend.device)).item() > 0)


@torch.no_grad()
def collect(
    ctx: RLContext, prompts: Sequence[str], critic: torch.nn.Module | None = None,
    missing_eos_penalty: float | None = None,
) -> Experience:
    """Sample one response per prompt of this rank's share of the global batch
    ``prompts``, and score it. Sampling uniforms are drawn for the global batch, so the
    responses do not depend on the world size. The policy's logprobs are recomputed with a
    full forward pass at the sampling temperature, so PPO's first ratio is 1."""
    backend = ctx.backend
    uniforms = draw_uniforms(len(prompts), ctx.rollout.max_new_tokens)  # same on every rank
    mine = backend.shard(list(range(len(prompts))))
    policy = ctx.policy.model
    was_training = policy.training
    policy.eval()
    with ctx.backend.autocast():
        rollout = sample(
            policy, ctx.policy.tokenizer, [prompts[i] for i in mine], ctx.rollout, backend.device,
            uniforms=uniforms[mine], any_alive=any_alive_fn(backend),
        )
        T = ctx.rollout.temperature
        logprobs = policy_logprobs(policy, rollout, T)
        ref_logprobs = policy_logprobs(ctx.reference.model, rollout, T)
        rm_scores = ctx.reward_model(rollout.input_ids, rollout.attention_mask).float()
        values = critic_values(critic, rollout).float() if critic is not None else None
    policy.train(was_training)
    scores = rm_scores.clone()
    if missing_eos_penalty is not None:
        # "N+ details": a truncated response gets a fixed low score instead of the RM's
        scores = torch.where(rollout.ended, scores, torch.full_like(scores, missing_eos_penalty))
    mask = rollout.response_mask.float()
    return Experience(rollout, logprobs.float(), ref_logprobs.float(), rm_scores, scores, values, mask)


def rollout_metrics(exp: Experience, kl: torch.Tensor, kl_coef: float, rollout_seconds: float) -> dict[str, float]:
    """The metrics every RL algorithm reports about a rollout, under stable names.
    ``kl``: (B, R) per-token KL to the reference."""
    return {
        "reward/proxy": exp.rm_scores.mean().item(),
        "reward/score": exp.scores.mean().item(),
        "rollout/kl": kl.sum(-1).mean().item(),  # nats per response
        "rollout/eos_rate": exp.rollout.ended.float().mean().item(),
        "rollout/length": exp.mask.sum(-1).mean().item(),
        "kl_coef": kl_coef,
        "perf/tokens_per_s": exp.mask.sum().item() / max(rollout_seconds, 1e-9),
        "perf/rollout_s": rollout_seconds,
    }
