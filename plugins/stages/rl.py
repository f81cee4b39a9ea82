"""``stages=[...,rl]``: reinforcement learning against a reward source with a KL penalty to
the SFT policy (InstructGPT section 3.5, eq. 2). The algorithm (``algorithm=ppo``) does the
maths; this stage loads the models, feeds it prompt batches and evaluates on the way."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import (
    PolicyLoader, PreferenceOptimizer, RewardModel, RewardModelLoader, RewardSource, RLContext, ScoringConfig, StepResult,
    optional,
)
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.memory import enable_gradient_checkpointing
from rlhfkit.rlhf.rollout import check_rl_rollout
from rlhfkit.settings import bounded


@dataclass
class RLConfig:
    steps: int = bounded(60, ge=1)
    """RL iterations (each: rollout, scoring, update)."""
    prompts_per_step: int = bounded(64, ge=1)
    """Rollout batch size."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Micro-batching of the scoring and training passes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (policy and critic): less memory, ~30%
    more compute."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate on held-out prompts before the first iteration and every N after it (0: only
    at the end): gold, proxy and KL to SFT as ``eval/*``, the points ``rlhfkit report``
    plots against d = sqrt(KL) and fits (Gao et al. 2022)."""
    log_every: int = bounded(5, ge=1)

    def validate(self, run: RunInfo) -> None:
        if "rl" in run.stages:
            check_rl_rollout(run.settings.rollout)


class RL:
    needs = ("sft",)
    data = ("prompts",)
    produces = "policy"
    uses_reward = True

    def __init__(self, cfg: RLConfig):
        self.cfg = cfg

    def run(self, ctx: StageContext) -> None:
        cfg, backend, loader = self.cfg, ctx.backend, ctx.components["policy"]
        seed_everything(ctx.seed + 2)
        policy = optional(loader, PolicyLoader, "adapt")(loader.load(ctx.products["sft"]))  # LoRA: a fresh adapter
        # under LoRA the reference is the policy with its adapter disabled: no second copy
        reference = optional(loader, PolicyLoader, "shared_reference")(policy) or ctx.load_policy("sft")
        reward = ctx.components["reward"]
        reward.setup(ctx, policy.tokenizer)
        ctx.data.bind(policy)
        tok = policy.tokenizer
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy.model)
        tracked = TrackingBackend(backend)  # the engines the algorithm prepares are checkpointed and guarded
        rl = RLContext(
            policy=policy, reference=reference, reward=reward, backend=tracked, rollout=ctx.rollout,
            make_critic=self.critic_factory(ctx, optional(reward, RewardSource, "critic_init")),
            demonstrations=lambda: [e for e, _, _ in ctx.data.demonstrations(tok, whole=True)],
            seed=ctx.seed, generate=ctx.components["generator"], scoring=cfg.scoring,
            more_prompts=lambda: [prompts[j] for j in next(batches)],  # the step's own stream (both bound below)
        )
        algorithm: PreferenceOptimizer = ctx.components.fresh("algorithm")
        algorithm.setup(rl)
        prompts = ctx.data.prompts("train", tok, ctx.rollout.max_new_tokens)
        if not prompts:
            raise ConfigError("The dataset has no usable RL prompts (train split).")
        if len(prompts) < cfg.prompts_per_step:  # every batch holds exactly prompts_per_step (checked against the ranks)
            ctx.out.warn(f"rl.prompts_per_step={cfg.prompts_per_step}, but the dataset has {len(prompts)} usable RL "
                         "prompts: each RL batch repeats some of them.")
            prompts = prompts * math.ceil(cfg.prompts_per_step / len(prompts))
        batches = Batches(len(prompts), cfg.prompts_per_step, ctx.seed + 2)
        eval_prompts = ctx.eval_prompts(tok)

        def evaluate(i: int) -> None:
            """Gold, proxy and KL to SFT after step ``i``: always the same held-out prompts and
            sampling stream, so the points of the over-optimisation curve (``rlhfkit report``)
            differ only by the policy."""
            evaluation = ctx.evaluate(policy, reference, reward, eval_prompts, stream=ctx.name)
            ctx.out.log(ctx.name, i, {f"eval/{k}": v for k, v in evaluation.metrics.items()})

        def step(i: int) -> StepResult:
            if cfg.eval_every and i == 1:
                evaluate(0)  # the SFT policy: the curve's origin, d = 0
            t0 = time.time()
            result = algorithm.step(rl.more_prompts())
            metrics = ctx.out.mean_over_ranks({**result.metrics, **optional(reward, RewardSource, "metrics")()})
            metrics["perf/step_s"] = time.time() - t0
            if cfg.eval_every and i % cfg.eval_every == 0 and i != cfg.steps:
                evaluate(i)
            return StepResult(metrics, result.kl)

        ctx.train(cfg.steps, cfg.log_every, step, tracked, {"batches": batches, "algorithm": algorithm})
        policy.model.eval()
        ctx.save(policy)

    def critic_factory(self, ctx: StageContext, init: str | None) -> Callable[..., RewardModel]:
        """``RLContext.make_critic``: ``make_critic(from_reward_model=True)``."""
        return lambda from_reward_model=True: self.critic(ctx, init if from_reward_model else None)

    def critic(self, ctx: StageContext, init: str | None) -> RewardModel:
        """The value model: the reward model's weights at ``init`` (the reward source's
        ``critic_init``: a model that reads the policy's tokens, InstructGPT's choice), else
        a fresh value head on SFT."""
        loader, head = ctx.components["reward_model"], ctx.components["reward_head"]
        if init:
            critic = loader.load(init, head)
            critic.requires_grad_(True)
            critic = optional(loader, RewardModelLoader, "adapt")(critic)
        else:
            critic = loader.build(ctx.products["sft"], head)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(optional(critic, RewardModel, "backbone") or critic)
        return critic


@hookimpl
def rlhfkit_register_stages(register):
    register("rl", RL, RLConfig)
