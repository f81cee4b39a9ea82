"""Rule reward sources, small on purpose: they are meant to be added to another source with
``reward=combined`` (a reward model plus a length or format rule), and work alone as well.

* ``reward=length``: ``-per_token * |n - target|``, where ``n`` is the response's tokens
  before EOS. ``target=0`` is a plain per-token cost (brevity); a target aims at a length.
* ``reward=format``: ``+bonus`` if the response (stripped of surrounding white space) matches
  the regular expression ``pattern`` (whole, or anywhere with ``match=search``), else
  ``-penalty``.

Neither needs a stage product, so either can drive RL alone: ``stages=[sft,rl] reward=length``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.settings import Invalid, bounded, one_of


@dataclass
class LengthRewardConfig:
    target: int = bounded(0, ge=0)
    """The response length (tokens before EOS) that scores 0; 0: every token costs."""
    per_token: float = bounded(0.1, ge=0)
    """Reward lost per token of distance from ``target``."""


class LengthReward:
    needs = ()

    def __init__(self, cfg: LengthRewardConfig):
        self.cfg = cfg

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        pass

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        n = rollout.response_mask.float().sum(-1) - rollout.ended.float()  # (B,) tokens before EOS
        return -self.cfg.per_token * (n - self.cfg.target).abs()


@dataclass
class FormatRewardConfig:
    pattern: str = ""
    """A regular expression (Python ``re``) the response must match."""
    match: str = one_of("full", "search")
    """full: the whole stripped response matches; search: the pattern occurs in it."""
    bonus: float = 1.0
    """Reward of a response that matches."""
    penalty: float = bounded(0.0, ge=0)
    """A response that does not match scores ``-penalty``."""

    def validate(self, run: Any = None) -> None:
        if not self.pattern:
            raise Invalid("pattern", self.pattern, "give the regular expression responses must match "
                          "(quote it on the command line: 'reward.pattern=\"\\d+ [-+*] \\d+\"')")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise Invalid("pattern", self.pattern, f"not a valid regular expression ({exc})") from None


class FormatReward:
    needs = ()

    def __init__(self, cfg: FormatRewardConfig):
        self.cfg = cfg
        self.regex = re.compile(cfg.pattern)

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        pass

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        find = self.regex.fullmatch if self.cfg.match == "full" else self.regex.search
        ok = [find(r.strip()) is not None for r in rollout.responses]
        return torch.tensor([self.cfg.bonus if x else -self.cfg.penalty for x in ok], dtype=torch.float32,
                            device=rollout.input_ids.device)  # (B,)


@hookimpl
def rlhfkit_register_rewards(register):
    register("length", LengthReward, LengthRewardConfig)
    register("format", FormatReward, FormatRewardConfig)
