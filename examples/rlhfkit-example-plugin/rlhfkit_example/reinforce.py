"""``algorithm=reinforce``: REINFORCE with a batch-mean baseline and the per-token KL
penalty. Critic-free: it never calls ``ctx.make_critic()``."""

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.rlhf.kl import kl_penalised_rewards
from rlhfkit.rlhf.logprobs import logprobs_from_logits, response_logits
from rlhfkit.rlhf.masked import masked_sum
from rlhfkit.rlhf.rollout import collect


@dataclass
class ReinforceConfig:
    lr: float = 1e-4
    """Policy learning rate."""
    kl_coef: float = 0.05
    """Per-token KL penalty to the SFT policy."""


class Reinforce:
    def __init__(self, cfg: ReinforceConfig):
        self.cfg = cfg

    def setup(self, ctx):
        self.ctx = ctx
        model = ctx.policy.model
        self.policy = ctx.backend.prepare(model, torch.optim.Adam(model.parameters(), lr=self.cfg.lr), None, 1.0)

    def step(self, prompts):
        exp = collect(self.ctx, prompts)
        rewards, kl = kl_penalised_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, exp.mask, self.cfg.kl_coef)
        returns = rewards.sum(-1)  # (B,)
        advantages = returns - returns.mean()  # batch-mean baseline
        logits = response_logits(self.policy, exp.rollout)
        logprobs = logprobs_from_logits(logits, exp.rollout.response_ids, self.ctx.rollout.temperature)
        loss = -(advantages * masked_sum(logprobs, exp.mask, dim=-1)).mean()
        self.policy.backward(loss)
        self.policy.step()
        return {"loss/policy": loss.item(), "reward/proxy": exp.rm_scores.mean().item(), "rollout/kl": kl.sum(-1).mean().item()}

    def state_dict(self):
        return {}  # no state of its own: the pipeline checkpoints the engine it prepared

    def load_state_dict(self, state):
        pass


@hookimpl
def rlhfkit_register_algorithms(register):
    register("reinforce", Reinforce, ReinforceConfig)
