"""``algorithm=ppo``: PPO as InstructGPT ran it, with the "N+ implementation details"
(Huang et al. 2024): a per-token KL penalty to the frozen SFT policy with a fixed or
adaptive coefficient, GAE, advantage whitening, a clipped value loss, a value model
initialised from the reward model, a penalty for responses without EOS, PPO-ptx, and the
same temperature for sampling and logprobs with dropout off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Backend, RLContext, StepResult
from rlhfkit.rlhf.advantages import gae
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.kl import kl_controller, kl_penalised_rewards
from rlhfkit.rlhf.logprobs import logprobs_and_entropy
from rlhfkit.rlhf.losses import causal_lm_loss, n_targets
from rlhfkit.rlhf.masked import dp_denominator, masked_mean, masked_whiten
from rlhfkit.resume import Batches
from rlhfkit.rlhf.minibatch import MicroBatch, mean_stats, minibatch_size, minibatch_updates
from rlhfkit.rlhf.rollout import collect, critic_values, rollout_metrics
from rlhfkit.rlhf.tokenize import encode_pairs
from rlhfkit.settings import bounded, one_of


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


@dataclass
class PPOConfig:
    lr: float = bounded(1e-4, gt=0)
    """Policy learning rate (Adam)."""
    critic_lr: float = bounded(1e-4, gt=0)
    """Value model learning rate."""
    kl_coef: float = bounded(0.3, ge=0)
    """beta in InstructGPT eq. 2: the per-token KL penalty (initial value if adaptive). 0.3:
    the reward model learns the built-in suites' flaws but not their tasks, so the penalty is
    what keeps answers right; 0.1 lowered gold on data=words (docs/overoptimisation.md)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = bounded(1.0, gt=0)
    """Target KL per response (nats) for the adaptive controller."""
    kl_horizon: int = bounded(10000, ge=1)
    """Horizon (samples) of the adaptive controller."""
    gamma: float = bounded(1.0, ge=0, le=1)
    """Discount."""
    lam: float = bounded(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_eps: float = bounded(0.2, gt=0)
    """PPO ratio clipping (PPO eq. 7)."""
    vf_clip: float = bounded(0.2, gt=0)
    """Value clipping range around the old values."""
    vf_coef: float = bounded(0.1, ge=0)
    """Weight of the value loss."""
    critic_init: str = one_of("reward_model", "sft")
    """Where the value model starts: ``reward_model``, a copy of the reward model
    (InstructGPT), or ``sft``, a fresh value head (``reward_head``) on the SFT policy. A
    reward source without a model that reads the policy's tokens always gives ``sft``."""
    ppo_epochs: int = bounded(4, ge=1)
    """Passes over each rollout batch."""
    num_minibatches: int = bounded(4, ge=1)
    """Minibatches per pass."""
    whiten_advantages: bool = True
    missing_eos_penalty: Optional[float] = -1.0
    """Score given to responses that hit max_new_tokens without EOS (null: RM score)."""
    ptx_coef: float = bounded(0.0, ge=0)
    """PPO-ptx: weight of the SFT (pretraining-mix) loss added to the policy loss."""
    ptx_batch_size: int = bounded(32, ge=1)
    entropy_coef: float = bounded(0.0, ge=0)
    """Entropy bonus (0: off, as in InstructGPT)."""
    max_grad_norm: float = bounded(1.0, ge=0)

    def validate(self, run: RunInfo) -> None:
        run.check_minibatches(self.num_minibatches)


def policy_objective(pg_loss: torch.Tensor, ptx_loss: torch.Tensor | None, ptx_coef: float) -> torch.Tensor:
    """InstructGPT eq. 2's second term: objective = RL + gamma * E_pretrain[log pi]; as a
    loss, pg_loss + ptx_coef * (SFT negative log-likelihood)."""
    return pg_loss if ptx_loss is None else pg_loss + ptx_coef * ptx_loss


def sft_batch_loss(model: torch.nn.Module, tokenizer: Any, examples, backend: Backend) -> torch.Tensor:
    """The SFT loss on this rank's share of ``examples``, averaged over the whole batch."""
    mine = backend.shard(examples)
    e = encode_pairs(tokenizer, [x.prompt for x in mine], [x.response for x in mine], backend.device)
    logits = model(input_ids=e.input_ids, attention_mask=e.attention_mask).logits
    denom = dp_denominator(n_targets(e.loss_mask), backend.all_reduce_sum, backend.world_size)
    return causal_lm_loss(logits, e.input_ids, e.loss_mask, denom=denom)


class PPO:
    def __init__(self, cfg: PPOConfig):
        if cfg.num_minibatches < 1 or cfg.ppo_epochs < 1:
            raise ConfigError("algorithm.num_minibatches and algorithm.ppo_epochs must be >= 1.")
        self.cfg = cfg
        self.kl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.minibatch_stats: list[dict[str, float]] = []  # of the last step, for inspection
        self.ptx: Batches | None = None  # PPO-ptx demonstration batches (setup)

    def setup(self, ctx: RLContext) -> None:
        cfg = self.cfg
        self.ctx = ctx
        # Minibatch shuffling draws from its own stream: the global RNG drives sampling and
        # must advance the same way whatever the world size (see rlhfkit.rlhf.rollout.collect).
        self.shuffle = torch.Generator().manual_seed(torch.initial_seed())
        disable_dropout(ctx.policy.model)
        self.critic = ctx.make_critic(from_reward_model=cfg.critic_init == "reward_model")  # InstructGPT: from the RM
        self.policy = ctx.backend.prepare(
            ctx.policy.model, torch.optim.Adam(ctx.policy.model.parameters(), lr=cfg.lr, eps=1e-5), None, cfg.max_grad_norm
        )
        self.value = ctx.backend.prepare(
            self.critic, torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, eps=1e-5), None, cfg.max_grad_norm
        )
        if cfg.ptx_coef > 0:  # PPO-ptx: endless batches of the demonstrations that fit the context whole
            demos = ctx.demonstrations()
            if not demos:
                raise ConfigError("algorithm.ptx_coef > 0 needs SFT demonstrations, and the dataset has none.")
            self.ptx = Batches(len(demos), cfg.ptx_batch_size, ctx.seed + 7, transform=lambda idx: [demos[i] for i in idx])

    def step(self, prompts: Sequence[str]) -> StepResult:
        cfg, ctx, backend = self.cfg, self.ctx, self.ctx.backend
        t0 = time.time()
        reduce = backend.all_reduce_sum if backend.world_size > 1 else None
        mb = minibatch_size(len(prompts), backend.world_size, cfg.num_minibatches)  # rows per minibatch, alike on every rank
        exp = collect(ctx, prompts, critic=self.critic, missing_eos_penalty=cfg.missing_eos_penalty)  # this rank's share
        t_rollout = time.time() - t0
        mask = exp.mask  # (B, R)
        # InstructGPT eq. 2: r(x, y) - beta * log(pi / pi_SFT), the KL per token, the score at EOS
        rewards, kl = kl_penalised_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask, self.kl.value)  # (B, R)
        advantages, returns = gae(rewards, exp.values, mask, cfg.gamma, cfg.lam)  # (B, R), (B, R)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce_sum=reduce)  # over the global batch
        self.minibatch_stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(mask.shape[0], generator=self.shuffle)
            self.minibatch_stats += minibatch_updates(
                exp, [self.policy, self.value], lambda m: self.loss(m, advantages[m.rows], returns[m.rows]),
                backend=backend, rows_per_minibatch=mb, micro_batch_size=ctx.scoring.train_micro_batch_size, order=order)
        metrics = rollout_metrics(exp, kl, self.kl.value, t_rollout)
        global_kl = float(backend.all_reduce_mean(torch.tensor(metrics["rollout/kl"])))
        self.kl.update(global_kl, len(prompts))
        out = mean_stats(self.minibatch_stats) | metrics
        out["reward/total"] = (rewards * mask).sum(-1).mean().item()
        out["perf/update_s"] = time.time() - t0 - t_rollout
        return StepResult(out, kl=global_kl)

    def loss(self, m: MicroBatch, advantages: torch.Tensor, returns: torch.Tensor):
        """The policy and value losses of one (trimmed) micro-batch; ``advantages`` and
        ``returns`` (b, R) are its rows'."""
        cfg, ctx, sub, denom = self.cfg, self.ctx, m.exp, m.denom
        R, mask, T = sub.mask.shape[1], sub.mask, ctx.rollout.temperature
        with ctx.backend.autocast():
            logprobs, token_entropy = logprobs_and_entropy(self.policy, sub.rollout, T, entropy_grad=cfg.entropy_coef > 0)  # (b, R)
            entropy = masked_mean(token_entropy, mask, denom=denom)
            pg_loss, st = clipped_policy_loss(logprobs, sub.logprobs, advantages[:, :R], mask, cfg.clip_eps, denom=denom)
            ptx_loss = None
            if cfg.ptx_coef > 0 and m.first:  # the SFT mix once per minibatch
                ptx_loss = sft_batch_loss(self.policy, ctx.policy.tokenizer, next(self.ptx), ctx.backend)
            loss = policy_objective(pg_loss - cfg.entropy_coef * entropy, ptx_loss, cfg.ptx_coef)
            values = critic_values(self.value, sub.rollout).float()  # (b, R)
            vf_loss, vf_clipfrac = clipped_value_loss(values, sub.values, returns[:, :R], mask, cfg.vf_clip, denom=denom)
        return [loss, cfg.vf_coef * vf_loss], {
            "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "loss/total": loss.item(),
            "loss/ptx": ptx_loss.item() if ptx_loss is not None else 0.0,
            "policy/ratio": st["ratio"].item(), "policy/clipfrac": st["clipfrac"].item(),
            "policy/approx_kl": st["approx_kl"].item(), "policy/entropy": entropy.item(),
            "value/clipfrac": vf_clipfrac.item(),
            # KL(pi || pi_SFT) of this micro-batch under the current policy
            "policy/kl_ref": masked_mean(logprobs.detach() - sub.ref_logprobs, mask).item(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The KL controller and the minibatch shuffler. The engines (weights, optimizers) are
        checkpointed by the pipeline."""
        return {"kl": self.kl.state_dict(), "shuffle": self.shuffle.get_state()} | (
            {"ptx": self.ptx.state_dict()} if self.ptx else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
        self.shuffle.set_state(state["shuffle"])
        if self.ptx:
            self.ptx.load_state_dict(state["ptx"])


@hookimpl
def rlhfkit_register_algorithms(register):
    register("ppo", PPO, PPOConfig)
