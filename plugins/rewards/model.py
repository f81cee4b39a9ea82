"""``reward=model`` (the default): RL rollouts are scored by the run's trained reward model,
the ``rm`` product (this run's, ``from_run``'s, or ``reward_model.path``), frozen and
normalised. A reward model with a vocabulary of its own reads re-tokenized text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.interfaces import RewardModel, optional
from rlhfkit.rlhf.retokenize import Retokenized, reward_model_context, same_vocabulary, score
from rlhfkit.rlhf.sampling import Rollout


@dataclass
class ModelRewardConfig:
    """No settings: the reward model itself is configured by ``reward_model`` and ``reward_head``."""


class ModelReward:
    needs = ("rm",)

    def __init__(self, cfg: ModelRewardConfig):
        self.critic_init: str | None = None

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        # from disk, not the RM stage's object: under ZeRO-3 that one is sharded for training
        path = ctx.products["rm"]
        rm = ctx.backend.prepare_frozen(ctx.components["reward_model"].load(path, ctx.components["reward_head"]))
        rm_tok = optional(rm, RewardModel, "tokenizer")
        if same_vocabulary(rm_tok, tokenizer):
            self.rm, self.critic_init = rm, path  # the value model may start as the RM: it reads the policy's tokens
        else:
            self.rm, self.critic_init = Retokenized(rm, rm_tok, tokenizer, reward_model_context(rm)), None

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return score(self.rm, rollout.input_ids, rollout.attention_mask, rollout.sequence_response_mask)  # (B,)


@hookimpl
def rlhfkit_register_rewards(register):
    register("model", ModelReward, ModelRewardConfig)
