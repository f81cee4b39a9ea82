"""``algorithm=a2c``: advantage actor-critic. On-policy, a single pass over each rollout,
no ratio and no clipping. It shares the rollout, the KL penalty and GAE with PPO through
pure functions, not through inheritance."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import RLContext, StepResult
from rlhfkit.rlhf.advantages import gae
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.kl import kl_controller, kl_penalised_rewards
from rlhfkit.rlhf.logprobs import logprobs_and_entropy
from rlhfkit.rlhf.masked import masked_mean, masked_whiten
from rlhfkit.rlhf.minibatch import MicroBatch, mean_stats, minibatch_size, minibatch_updates
from rlhfkit.rlhf.rollout import collect, critic_values, rollout_metrics
from rlhfkit.settings import bounded, one_of


@dataclass
class A2CConfig:
    lr: float = bounded(1e-4, gt=0)
    """Policy learning rate (Adam)."""
    critic_lr: float = bounded(1e-4, gt=0)
    """Value model learning rate."""
    kl_coef: float = bounded(0.3, ge=0)
    """Per-token KL penalty to the SFT policy (initial value if adaptive). 0.3, as PPO's: the
    reward model's rewards have std 1 over SFT samples (``rm.scale``), so it weighs alike on
    every suite (docs/overoptimisation.md)."""
    adaptive_kl: bool = False
    target_kl: float = bounded(1.0, gt=0)
    kl_horizon: int = bounded(10000, ge=1)
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    """GAE lambda (1.0: Monte Carlo returns minus the baseline)."""
    vf_coef: float = bounded(0.1, ge=0)
    critic_init: str = one_of("sft", "reward_model")
    """Where the value model starts: ``sft``, a fresh value head (``reward_head``) on the SFT
    policy, or ``reward_model``, a copy of the reward model (InstructGPT's choice, PPO's
    default). The reward model's per-token outputs are not values (a summed score's offset
    at every token) and A2C fits its critic once per rollout: started from the reward model
    it lowered gold on data=words seed 1; started on SFT it raised gold on all nine built-in
    suite-seeds (docs/overoptimisation.md section 5)."""
    num_minibatches: int = bounded(4, ge=1)
    """Gradient steps per rollout, each on a disjoint quarter of it (4: one step per rollout
    left the policy where SFT put it on data=words, docs/overoptimisation.md)."""
    whiten_advantages: bool = True
    missing_eos_penalty: Optional[float] = -1.0
    """Score for responses without EOS (null: RM score)."""
    entropy_coef: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)

    def validate(self, run: RunInfo) -> None:
        run.check_minibatches(self.num_minibatches)


def a2c_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """Policy gradient with a learned baseline: -E[A_t log pi(y_t)] over response tokens."""
    return -masked_mean(advantages * logprobs, mask, denom=denom)


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    return 0.5 * masked_mean((values - returns) ** 2, mask, denom=denom)


class A2C:
    def __init__(self, cfg: A2CConfig):
        if cfg.num_minibatches < 1:
            raise ConfigError("algorithm.num_minibatches must be >= 1.")
        self.cfg = cfg
        self.kl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)

    def setup(self, ctx: RLContext) -> None:
        cfg = self.cfg
        self.ctx = ctx
        disable_dropout(ctx.policy.model)
        self.critic = ctx.make_critic(from_reward_model=cfg.critic_init == "reward_model")
        self.policy = ctx.backend.prepare(ctx.policy.model, torch.optim.Adam(ctx.policy.model.parameters(), lr=cfg.lr), None, cfg.max_grad_norm)
        self.value = ctx.backend.prepare(self.critic, torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr), None, cfg.max_grad_norm)

    def step(self, prompts: Sequence[str]) -> StepResult:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.time()
        backend = ctx.backend
        reduce = backend.all_reduce_sum if backend.world_size > 1 else None
        mb = minibatch_size(len(prompts), backend.world_size, cfg.num_minibatches)  # rows per minibatch, alike on every rank
        exp = collect(ctx, prompts, critic=self.critic, missing_eos_penalty=cfg.missing_eos_penalty)  # this rank's share
        t_rollout = time.time() - t0
        mask = exp.mask
        rewards, kl = kl_penalised_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask, self.kl.value)
        advantages, returns = gae(rewards, exp.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce_sum=reduce)
        stats = minibatch_updates(  # one pass: every sample is used once
            exp, [self.policy, self.value], lambda m: self.loss(m, advantages[m.rows], returns[m.rows]),
            backend=backend, rows_per_minibatch=mb, micro_batch_size=ctx.scoring.train_micro_batch_size)
        metrics = rollout_metrics(exp, kl, self.kl.value, t_rollout)
        global_kl = float(backend.all_reduce_mean(torch.tensor(metrics["rollout/kl"])))
        self.kl.update(global_kl, len(prompts))
        out = mean_stats(stats) | metrics
        out["perf/update_s"] = time.time() - t0 - t_rollout
        return StepResult(out, kl=global_kl)

    def loss(self, m: MicroBatch, advantages: torch.Tensor, returns: torch.Tensor):
        cfg, ctx, sub, denom = self.cfg, self.ctx, m.exp, m.denom
        R, mask, T = sub.mask.shape[1], sub.mask, ctx.rollout.temperature
        with ctx.backend.autocast():
            logprobs, token_entropy = logprobs_and_entropy(self.policy, sub.rollout, T, entropy_grad=cfg.entropy_coef > 0)  # (b, R)
            entropy = masked_mean(token_entropy, mask, denom=denom)
            pg_loss = a2c_policy_loss(logprobs, advantages[:, :R], mask, denom)
            vf_loss = value_loss(critic_values(self.value, sub.rollout).float(), returns[:, :R], mask, denom)
        return [pg_loss - cfg.entropy_coef * entropy, cfg.vf_coef * vf_loss], {
            "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "policy/entropy": entropy.item()}

    def state_dict(self) -> dict[str, Any]:
        """The KL controller. The engines (weights, optimizers) are
        checkpointed by the pipeline."""
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])


@hookimpl
def rlhfkit_register_algorithms(register):
    register("a2c", A2C, A2CConfig)
