"""``reward=ensemble``: RL rollouts scored by an ensemble of reward models (Coste et al. 2023,
"Reward Model Ensembles Help Mitigate Overoptimization"), the members the ``rm`` stage
trains with ``rm.ensemble_size=K`` (K >= 2), combined by a conservative objective::

    rlhfkit rm.ensemble_size=3 reward=ensemble reward.objective=uwo reward.uwo_lambda=0.5

- ``mean``: the members' mean score.
- ``wco`` (worst-case optimisation): the lowest member's score, ``min_k r_k``.
- ``uwo`` (uncertainty-weighted optimisation): ``mean_k r_k - lambda * var_k r_k``, the
  intra-ensemble variance (over the members, ``1/K``; Coste et al. eq. 3).

Each member is loaded with the head it was trained with (``rm.member_heads``) and
normalised on its own (its bias and gain, from the ``rm`` stage), then the members are
combined; with ``reward.center`` the combination is shifted so that the SFT demonstrations
score mean 0 under it too, as each member does (``wco`` and ``uwo`` score below the
members' mean). Scoring is batched: each member reads the same batch in one
forward pass (re-tokenized once, when the members have a vocabulary of their own).

PPO's value model (``critic_init``) starts as member 0, as InstructGPT's starts as its
reward model: its values are on the combined reward's scale to within the members'
disagreement, and with ``center`` their mean on the SFT demonstrations matches it. (A2C's
starts on SFT by default: ``algorithm.critic_init``.)

Each RL step logs the members' disagreement on its rollouts: the standard deviation over
members of each row's scores, averaged over the batch (``reward/ensemble/std_mean``) and
at its largest row (``std_max``), the variance (``var_mean``), the members' mean score
(``reward/ensemble/mean``) and each member's (``reward/ensemble/member/<k>``). Held-out
evaluations report the same for the evaluated policy's samples. A policy whose
disagreement grows is moving where the reward models do not agree: the warning sign of
over-optimisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import RewardModel, optional
from rlhfkit.plugins.stages.rm import ensemble_members_with_heads, head_builder
from rlhfkit.registry import installed
from rlhfkit.rlhf.retokenize import Retokenized, reward_model_context, same_vocabulary, score
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.rlhf.tokenize import encode_pairs
from rlhfkit.settings import bounded, one_of


OBJECTIVES = ("mean", "wco", "uwo")
"""mean: the members' mean score; wco (worst-case optimisation): the lowest member's score;
uwo (uncertainty-weighted optimisation): mean - uwo_lambda * variance over the members."""


@dataclass
class EnsembleRewardConfig:
    objective: str = one_of(*OBJECTIVES)
    """How the members' scores are combined: mean, wco (min) or uwo (mean - lambda * variance)."""
    uwo_lambda: float = bounded(1.0, ge=0)
    """lambda of uwo: the weight of the intra-ensemble variance."""
    center: bool = True
    """Shift the combined score so the SFT demonstrations score mean 0 under it, as each
    member's do."""

    def validate(self, run: RunInfo) -> None:
        rm = getattr(run.settings, "rm", None)
        if "rm" in run.stages and rm is not None and rm.ensemble_size < 2:
            raise ConfigError(f"reward=ensemble scores with several reward models, but rm.ensemble_size={rm.ensemble_size}: "
                              "set rm.ensemble_size=K with K >= 2 (3 to 5 is usual), or use reward=model.")
        from_run = getattr(run.settings, "from_run", None)
        if "rm" not in run.stages and from_run:
            from rlhfkit.pipeline import find_checkpoint

            path = find_checkpoint(from_run, "rm")
            if path is not None:
                check_members(path)


def check_members(path: str) -> list[tuple[str, str | None]]:
    """The members of the ``rm`` product at ``path``: each one's directory and reward head
    (None: the run's ``reward_head``); an error unless there are at least two, all there,
    each with a reward head that is installed."""
    members = ensemble_members_with_heads(path)
    if len(members) < 2:
        raise ConfigError(f"reward=ensemble: the reward model at {path} is a single one, not an ensemble. Train one with "
                          "stages=[...,rm,...] rm.ensemble_size=K (K >= 2), or use reward=model.")
    missing = [d for d, _ in members if not os.path.isdir(d)]
    if missing:
        raise ConfigError(f"reward=ensemble: {path}/ensemble.json lists {missing[0]}, which does not exist. "
                          "Train the rm stage again.")
    installed_heads = installed().names("reward_head")
    unknown = [h for _, h in members if h is not None and h not in installed_heads]
    if unknown:
        raise ConfigError(f"reward=ensemble: the ensemble at {path} has a member with reward head {unknown[0]!r}, which "
                          f"no installed plugin registers (installed: {', '.join(installed_heads)}). Install the plugin "
                          "that registers it, or train the rm stage again.")
    return members


def ensemble_objective(scores: torch.Tensor, objective: str, uwo_lambda: float = 1.0) -> torch.Tensor:
    """(K, B) members' scores -> (B,) the combined score (Coste et al. 2023, section 3)."""
    if objective == "mean":
        return scores.mean(0)
    if objective == "wco":
        return scores.min(0).values  # WCO: min_k r_k
    if objective != "uwo":
        raise ValueError(f"unknown ensemble objective {objective!r}; one of {OBJECTIVES}")
    # UWO: mean_k r_k - lambda * (1/K) sum_k (r_k - mean)^2, the intra-ensemble variance
    return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)


class Members(torch.nn.Module):
    """The members as one module: ``forward(input_ids, attention_mask) -> (K, B)``, one
    forward pass of each member over the whole batch."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([score(m, input_ids, attention_mask, response_mask).float() for m in self.members])  # (K, B)


class EnsembleReward:
    needs = ("rm",)

    def __init__(self, cfg: EnsembleRewardConfig):
        self.cfg = cfg
        self.critic_init: str | None = None
        self.offset, self.size = 0.0, 0
        self._reset()

    def _reset(self) -> None:
        self._rows, self._std, self._var, self._std_max = 0, 0.0, 0.0, 0.0
        self._member_sums: torch.Tensor | None = None

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        path = ctx.products["rm"]
        loader = ctx.components["reward_model"]
        # from disk, not the RM stage's objects (under ZeRO-3 those are sharded for training)
        members = [ctx.backend.prepare_frozen(loader.load(p, head_builder(ctx.components, h))) for p, h in check_members(path)]
        self.size = len(members)
        stack = Members(members)
        rm_tok = optional(members[0], RewardModel, "tokenizer")
        self.context = reward_model_context(members[0]) or ctx.data.context
        if same_vocabulary(rm_tok, tokenizer):
            self.scorer, self.critic_init = stack, path  # member 0 (the product's top level) reads the policy's tokens
        else:
            self.scorer, self.critic_init = Retokenized(stack, rm_tok, tokenizer, self.context), None
        self.offset = 0.0
        if self.cfg.center:
            demos = ctx.components["data"].sft_examples("train")[: ctx.eval.num_prompts]
            if demos:
                scores = self.score_texts(ctx, stack, rm_tok or tokenizer, [d.prompt for d in demos],
                                          [d.response for d in demos])
                self.offset = float(ensemble_objective(scores, self.cfg.objective, self.cfg.uwo_lambda).mean())
        self._reset()

    @torch.no_grad()
    def score_texts(self, ctx: StageContext, stack: Members, tok: Any, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(K, N): the members' scores of (prompt, response) texts, read as the rm stage reads
        them when it normalises each member."""
        out, bs = [], ctx.eval.batch_size
        for i in range(0, len(prompts), bs):
            e = encode_pairs(tok, prompts[i : i + bs], responses[i : i + bs], ctx.device, max_length=self.context)
            with ctx.backend.autocast():
                out.append(stack(e.input_ids, e.attention_mask, e.loss_mask))
        return torch.cat(out, dim=1)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        scores = score(self.scorer, rollout.input_ids, rollout.attention_mask, rollout.sequence_response_mask).float()  # (K, B)
        self.record(scores)
        return ensemble_objective(scores, self.cfg.objective, self.cfg.uwo_lambda) - self.offset  # (B,)

    def record(self, scores: torch.Tensor) -> None:
        std = scores.std(0, unbiased=False)  # (B,) disagreement per row
        self._rows += scores.shape[1]
        self._std += float(std.sum())
        self._var += float((std**2).sum())
        self._std_max = max(self._std_max, float(std.max())) if std.numel() else self._std_max
        sums = scores.sum(1).cpu()  # (K,)
        self._member_sums = sums if self._member_sums is None else self._member_sums + sums

    def metrics(self) -> dict[str, float]:
        """The members' disagreement on what was scored since the last call."""
        n = max(self._rows, 1)
        members = self._member_sums if self._member_sums is not None else torch.zeros(self.size)
        out = {"reward/ensemble/std_mean": self._std / n, "reward/ensemble/std_max": self._std_max,
               "reward/ensemble/var_mean": self._var / n, "reward/ensemble/mean": float(members.mean()) / n}
        out |= {f"reward/ensemble/member/{k}": float(v) / n for k, v in enumerate(members.tolist())}
        self._reset()
        return out


@hookimpl
def rlhfkit_register_rewards(register):
    register("ensemble", EnsembleReward, EnsembleRewardConfig)
