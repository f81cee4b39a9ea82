"""``stages=[...,rm,...]``: the reward model, trained on K-wise ranked comparisons of the
SFT policy's samples (InstructGPT section 3.5, eq. 1). Its product ``rm/`` is what
``reward=model`` scores RL rollouts with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Comparison, RewardModel, RewardModelLoader, StepResult, optional
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.losses import comparison_pairs, kwise_loss, pairwise_loss
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.retokenize import reward_model_context
from rlhfkit.rlhf.schedule import adamw_cosine
from rlhfkit.rlhf.tokenize import encode_pairs
from rlhfkit.settings import bounded


class RMLoss(str, Enum):
    kwise = "kwise"
    """InstructGPT: all C(K,2) pairs of a prompt form one batch element."""
    pairwise = "pairwise"
    """One (chosen, rejected) pair per batch element."""


@dataclass
class RMConfig:
    loss: RMLoss = RMLoss.kwise
    """kwise (InstructGPT) or pairwise."""
    epochs: int = bounded(2, ge=1)
    batch_size: int = bounded(16, ge=1)
    """Prompts (kwise) or pairs (pairwise) per step."""
    lr: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(10, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    normalize: bool = True
    """Shift rewards so the SFT demonstrations score mean 0."""
    log_every: int = bounded(25, ge=1)


def as_pairs(comparisons: Sequence[Comparison]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for every strictly ordered pair."""
    win, lose, group = comparison_pairs([c.scores for c in comparisons])
    flat = [(c.prompt, r) for c in comparisons for r in c.responses]
    return [(flat[w][0], flat[w][1], flat[l][1]) for w, l in zip(win.tolist(), lose.tolist())]


class RM:
    needs = ("sft",)
    data = ("comparisons",)
    produces = "reward_model"
    uses_reward = False

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg

    def run(self, ctx: StageContext) -> None:
        cfg, backend, loader = self.cfg, ctx.backend, ctx.components["reward_model"]
        seed_everything(ctx.seed + 1)
        # from the product on disk (what a stage run alone does): the SFT stage's object may be sharded
        sft = ctx.load_policy("sft")
        ctx.data.bind(sft)
        sample = ctx.sampler(sft)
        train = ctx.data.comparisons("train", sample, sft.tokenizer)
        test = ctx.data.comparisons("test", sample, sft.tokenizer)
        ctx.data.report()
        if not train:
            raise ConfigError("The dataset has no usable comparisons for the reward model (train split).")
        base = optional(loader, RewardModelLoader, "base_model") or ctx.products["sft"]
        rm = loader.build(base, ctx.components["reward_head"])
        self.tok = optional(rm, RewardModel, "tokenizer") or sft.tokenizer  # the RM reads text with its own tokenizer
        self.context = reward_model_context(rm) or ctx.data.context
        units = train if cfg.loss == RMLoss.kwise else as_pairs(train)
        steps = cfg.epochs * math.ceil(len(units) / cfg.batch_size)
        optimizer, scheduler = adamw_cosine(rm.parameters(), cfg, steps)
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(rm, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(units), cfg.batch_size, ctx.seed + 1)
        loss_fn = {RMLoss.kwise: self.kwise, RMLoss.pairwise: self.pairwise}[cfg.loss]

        def step(_: int) -> StepResult:
            batch = backend.shard([units[i] for i in next(batches)])
            with backend.autocast():
                loss, acc = loss_fn(ctx, engine, batch)
            engine.backward(loss)
            grad_norm = engine.step()
            return StepResult({"loss/rm": loss.item(), "rm/train_accuracy": acc.item(), "lr": scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm})

        ctx.train(steps, cfg.log_every, step, tracked, {"batches": batches})
        rm.eval()
        metrics = {"rm/accuracy": self.accuracy(ctx, rm, test)}
        if cfg.normalize:
            demos = ctx.components["data"].sft_examples("train")[: ctx.eval.num_prompts]
            bias = float(self.scores(ctx, rm, [d.prompt for d in demos], [d.response for d in demos]).mean() + rm.bias)
            rm.set_bias(bias)
            metrics["rm/bias"] = bias
        ctx.out.log("rm", steps, metrics)
        ctx.save(rm)

    # The losses over this rank's share of a batch, normalised so that the average over
    # ranks is the loss over the whole batch.

    def kwise(self, ctx: StageContext, model: Any, batch: list[Comparison]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [c.prompt for c in batch for _ in c.responses]
        e = encode_pairs(self.tok, prompts, [r for c in batch for r in c.responses], ctx.device, max_length=self.context)
        rewards = model(e.input_ids, e.attention_mask)  # (sum K,) each completion once
        win, lose, group = comparison_pairs([c.scores for c in batch])
        denom = dp_denominator(float(len(set(group.tolist()))), ctx.backend.all_reduce_sum, ctx.backend.world_size)
        return kwise_loss(rewards, win, lose, group, len(batch), denom=denom)  # InstructGPT eq. 1

    def pairwise(self, ctx: StageContext, model: Any, batch: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [p for p, _, _ in batch] * 2
        e = encode_pairs(self.tok, prompts, [c for _, c, _ in batch] + [r for _, _, r in batch], ctx.device,
                         max_length=self.context)
        rewards = model(e.input_ids, e.attention_mask)  # (2B,) chosen then rejected
        denom = dp_denominator(float(len(batch)), ctx.backend.all_reduce_sum, ctx.backend.world_size)
        return pairwise_loss(rewards[: len(batch)], rewards[len(batch) :], denom=denom)

    @torch.no_grad()
    def scores(self, ctx: StageContext, rm: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out, bs = [], ctx.eval.batch_size
        for i in range(0, len(prompts), bs):
            e = encode_pairs(self.tok, prompts[i : i + bs], responses[i : i + bs], ctx.device, max_length=self.context)
            with ctx.backend.autocast():
                out.append(rm(e.input_ids, e.attention_mask).float())
        return torch.cat(out)

    def accuracy(self, ctx: StageContext, rm: RewardModel, comparisons: Sequence[Comparison]) -> float:
        """Held-out accuracy: the fraction of strictly ordered pairs the RM orders the same way."""
        if not comparisons:
            return float("nan")
        rewards = self.scores(ctx, rm, [c.prompt for c in comparisons for _ in c.responses],
                              [r for c in comparisons for r in c.responses])
        win, lose, _ = comparison_pairs([c.scores for c in comparisons])
        return float((rewards[win] > rewards[lose]).float().mean())


@hookimpl
def rlhfkit_register_stages(register):
    register("rm", RM, RMConfig)
