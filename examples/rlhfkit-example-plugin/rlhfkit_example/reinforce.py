"""``algorithm=reinforce``: REINFORCE (Williams 1992) with a batch-mean baseline, against
the reward with InstructGPT's KL penalty (Ouyang et al. 2022, eq. 2). Critic-free: it never
calls ``ctx.make_critic()``.

    R(x, y) = r(x, y) - beta * sum_t [log pi(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)]   (InstructGPT eq. 2)
    loss    = -1/N * sum_i (R_i - mean_j R_j) * log pi(y_i | x_i)                          (Williams 1992)

One pass over the rollout (on-policy) in ``num_minibatches`` optimizer steps, through
:func:`rlhfkit.rlhf.minibatch.minibatch_updates`, which owns the multi-rank rules.
"""

import time
from dataclasses import dataclass
from typing import Optional

import torch

from rlhfkit import hookimpl
from rlhfkit.interfaces import StepResult
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.kl import kl_penalised_rewards
from rlhfkit.rlhf.logprobs import response_logprobs
from rlhfkit.rlhf.masked import masked_sum
from rlhfkit.rlhf.minibatch import MicroBatch, mean_stats, minibatch_size, minibatch_updates
from rlhfkit.rlhf.rollout import collect, rollout_metrics
from rlhfkit.settings import bounded


@dataclass
class ReinforceConfig:
    lr: float = bounded(1e-4, gt=0)
    """Policy learning rate (Adam)."""
    kl_coef: float = bounded(0.05, ge=0)
    """beta: the KL penalty to the SFT policy, in the reward (InstructGPT eq. 2)."""
    num_minibatches: int = bounded(1, ge=1)
    """Optimizer steps per rollout, each on a disjoint share of it (one pass: on-policy)."""
    missing_eos_penalty: Optional[float] = -1.0
    """Score for responses without EOS (null: the reward source's score)."""
    max_grad_norm: float = bounded(1.0, ge=0)

    def validate(self, run):
        # rl.prompts_per_step must split evenly over the ranks and the minibatches
        run.check_minibatches(self.num_minibatches)


class Reinforce:
    def __init__(self, cfg: ReinforceConfig):
        self.cfg = cfg

    def setup(self, ctx):
        self.ctx = ctx
        model = ctx.policy.model
        disable_dropout(model)  # sampling and training passes must agree
        self.policy = ctx.backend.prepare(model, torch.optim.Adam(model.parameters(), lr=self.cfg.lr), None,
                                          self.cfg.max_grad_norm)

    def step(self, prompts):
        cfg, ctx, backend = self.cfg, self.ctx, self.ctx.backend
        rows = minibatch_size(len(prompts), backend.world_size, cfg.num_minibatches)  # alike on every rank
        t0 = time.time()
        exp = collect(ctx, prompts, missing_eos_penalty=cfg.missing_eos_penalty)  # this rank's share; (B, R) tensors
        t_rollout = time.time() - t0
        rewards, kl = kl_penalised_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, exp.mask, cfg.kl_coef)  # (B, R)
        returns = rewards.sum(-1)  # (B,) R(x, y), eq. 2
        baseline = backend.all_reduce_mean(returns.mean())  # the global batch mean (equal shares on every rank)
        advantages = returns - baseline  # (B,)

        def loss(m: MicroBatch):
            with backend.autocast():
                logprobs, _ = response_logprobs(self.policy, m.exp.rollout, ctx.rollout.temperature)  # (b, R')
                seq_logprobs = masked_sum(logprobs, m.exp.mask, dim=-1)  # (b,) log pi(y | x)
                # a per-row denominator: m.denom counts the minibatch's rows over every rank
                pg_loss = -(advantages[m.rows] * seq_logprobs).sum() / m.denom
            return [pg_loss], {"loss/policy": pg_loss.item()}

        stats = minibatch_updates(exp, [self.policy], loss, backend=backend, rows_per_minibatch=rows,
                                  micro_batch_size=ctx.scoring.train_micro_batch_size, per="row")
        metrics = rollout_metrics(exp, kl, cfg.kl_coef, t_rollout)
        metrics.update(mean_stats(stats))
        global_kl = float(backend.all_reduce_mean(torch.tensor(metrics["rollout/kl"])))  # for the divergence guard
        return StepResult(metrics, kl=global_kl)

    def state_dict(self):
        return {}  # no state of its own: the loop checkpoints the engine it prepared, and the RNGs

    def load_state_dict(self, state):
        pass


@hookimpl
def rlhfkit_register_algorithms(register):
    register("reinforce", Reinforce, ReinforceConfig)
