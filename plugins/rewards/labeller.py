"""``reward=labeller``: the dataset's programmatic labeller as the reward, a verifiable
reward. It needs no stage product, so RL runs with no reward model:
``rlhfkit stages=[sft,rl] reward=labeller``.

On the built-in suite the labeller is the gold one, so RL then optimises exactly what the
final evaluation's ``gold`` column measures (and ``proxy`` equals ``gold``): no
over-optimisation gap to a learned reward model, only the KL penalty holding the policy
near SFT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Dataset, Labeller
from rlhfkit.rlhf.sampling import Rollout


@dataclass
class LabellerRewardConfig:
    """No settings: the labeller is the dataset's (``data=...``)."""


def dataset_labeller(data: Dataset) -> Labeller:
    """The dataset's labeller, or a one-line error naming the fix."""
    labeller = getattr(data, "labeller", None)
    if labeller is None:
        raise ConfigError(f"reward=labeller: the dataset ({type(data).__name__}) has no programmatic labeller to score "
                          "with. Use a dataset with one (data=synthetic, data=verifiable), or another reward source "
                          "(reward=model, reward=python_exec).")
    return labeller


class LabellerReward:
    needs = ()

    def __init__(self, cfg: LabellerRewardConfig):
        self.labeller: Labeller | None = None

    def check_data(self, data: Dataset) -> None:
        dataset_labeller(data)

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        self.labeller = dataset_labeller(ctx.components["data"])

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        scores = self.labeller.score(rollout.prompts, rollout.responses)
        return torch.tensor(scores, dtype=torch.float32, device=rollout.input_ids.device)  # (B,)


@hookimpl
def rlhfkit_register_rewards(register):
    register("labeller", LabellerReward, LabellerRewardConfig)
