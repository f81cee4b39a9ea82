"""``algorithm=grpo``: Group Relative Policy Optimization (Shao et al. 2024) and the variants
built on it, as settings of one algorithm (presets ``algorithm=grpo_dr``, ``grpo_dapo``,
``grpo_gspo`` in conf/algorithm/):

- GRPO: G responses per prompt, each one's advantage its reward normalised within the
  group (no critic), PPO's clipped ratio per token, a k3 KL to the SFT policy in the loss,
  each response's token losses averaged and the responses averaged (eq. 3);
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std normalisation,
  and the token losses summed and divided by a constant (the length budget), not by each
  response's own length: both biases of GRPO removed;
- DAPO (Yu et al. 2025): decoupled clip ranges (eq. 10), one mean over all the batch's
  tokens (eq. 12), dynamic sampling that replaces groups whose rewards are all equal
  (eq. 11), and the soft overlong penalty (eq. 13);
- GSPO (Zheng et al. 2025): the importance ratio of the whole sequence, the geometric mean
  of its token ratios, clipped per sequence (eqs. 5-7).

Groups of G stay on one rank (contiguous sharding of adjacent copies, as in RLOO). The
group statistics are therefore local and exact under any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import RLContext, StepResult
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.kl import kl_controller, per_token_kl
from rlhfkit.rlhf.logprobs import response_logprobs
from rlhfkit.rlhf.masked import masked_mean
from rlhfkit.rlhf.minibatch import MicroBatch, mean_stats, minibatch_size, minibatch_updates
from rlhfkit.rlhf.rollout import Experience, collect, rollout_metrics
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.settings import Invalid, bounded, one_of

LOSS_AGG = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    num_generations: int = bounded(8, ge=2)
    """G: responses sampled per prompt (the group whose rewards normalise each other). 8, as
    TRL's default: with pass/fail rewards a group of 4 ties (no signal) far more often."""
    lr: float = bounded(3e-4, gt=0)
    """Policy learning rate (Adam)."""
    epochs: int = bounded(1, ge=1)
    """mu: passes over each rollout batch (1: on-policy, the ratio is 1 at the first step)."""
    num_minibatches: int = bounded(4, ge=1)
    """Optimizer steps per pass, each on an equal share of the rollout (4, as PPO here and
    verl's mini-batches: one step per rollout left the policy nearly where SFT put it)."""
    clip_eps_low: float = bounded(0.2, gt=0, lt=1)
    """The ratio is clipped below at 1 - clip_eps_low (PPO eq. 7; DAPO eq. 10)."""
    clip_eps_high: float = bounded(0.2, gt=0)
    """... and above at 1 + clip_eps_high (DAPO's clip-higher: 0.28)."""
    kl_coef: float = bounded(0.3, ge=0)
    """beta: weight of the KL to the SFT policy (0: none). 0.3, as PPO's: at 0.1 GRPO ran to
    KL 3.7 on data=words and lowered gold by 0.23 (docs/overoptimisation.md)."""
    kl_in: str = one_of("loss", "reward", default="reward")
    """Where the KL goes: ``reward`` (the default), the k1 sum over the response subtracted from
    its reward before the group normalisation (InstructGPT eq. 2, at PPO's coefficient here);
    ``loss``, the k3 estimator per token (GRPO eq. 3-4, with beta 0.04 in the paper). Against a
    learned reward model the k3 term at 0.04 did not hold the policy (KL 22, gold 0.70 -> 0.30;
    docs/algorithms.md)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = bounded(1.0, gt=0)
    kl_horizon: int = bounded(10000, ge=1)
    scale_rewards: bool = True
    """Divide each group's centred rewards by their std (GRPO); false: Dr. GRPO."""
    loss_agg: str = one_of(*LOSS_AGG)
    """How token losses become the loss: seq-mean-token-mean (GRPO), token-mean (DAPO),
    seq-mean-token-sum-norm (Dr. GRPO: sums divided by rollout.max_new_tokens)."""
    ratio_level: str = one_of("token", "sequence")
    """Importance ratio per token (GRPO), or per sequence (GSPO eq. 7)."""
    dynamic_sampling: bool = False
    """DAPO eq. 11: replace groups whose scores are all equal (zero advantage, no gradient) by
    groups of fresh prompts, for up to max_refill_rounds extra generation rounds."""
    max_refill_rounds: int = bounded(2, ge=1)
    """The cap on extra generation rounds per step (DAPO's max_num_gen_batches - 1); groups
    still unfilled after it are trained on as they are (zero advantage)."""
    overlong_buffer: int = bounded(0, ge=0)
    """L_cache of DAPO eq. 13 (0: off): responses longer than rollout.max_new_tokens -
    overlong_buffer lose up to overlong_penalty, linearly."""
    overlong_penalty: float = bounded(1.0, ge=0)
    """The penalty at rollout.max_new_tokens tokens."""
    missing_eos_penalty: Optional[float] = -1.0
    """Score for responses without EOS (null: the reward source's score)."""
    max_grad_norm: float = bounded(1.0, ge=0)

    def validate(self, run: RunInfo) -> None:
        # groups of G stay on one rank: contiguous sharding of whole prompts
        run.check_minibatches(self.num_minibatches)
        rollout = getattr(run.settings, "rollout", None)
        if rollout is not None and self.overlong_buffer >= rollout.max_new_tokens:
            raise Invalid("overlong_buffer", self.overlong_buffer,
                          f"must be < rollout.max_new_tokens={rollout.max_new_tokens} (DAPO eq. 13: the soft "
                          "penalty starts at max_new_tokens - overlong_buffer); 0 turns it off")
        if self.adaptive_kl and self.kl_coef == 0:
            raise Invalid("adaptive_kl", True, "needs algorithm.kl_coef > 0 (an adaptive coefficient starting at 0 stays 0)")


# --- advantages and rewards -------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(n * G,) rewards, grouped by prompt -> (n * G,) advantages. GRPO's outcome
    supervision (Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean(r)) / std(r) over the
    group, the same for every token of response i; ``scale=False`` keeps r_i - mean(r)
    (Dr. GRPO, Liu et al. 2025). A group of identical rewards gets zero advantage."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    return centred.view(-1)


def zero_std_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(n * G,) -> (n,) bool: groups whose scores are all equal (DAPO eq. 11's filter
    0 < |{correct}| < G, for any score): their advantages are zero."""
    r = scores.view(-1, group_size)
    return (r.max(-1).values - r.min(-1).values) <= tol


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13, the soft overlong punishment: 0 for |y| <= L_max - L_cache, then
    ((L_max - L_cache) - |y|) / L_cache down to -1 at L_max, and -1 beyond. Scaled by
    ``penalty``; (B,) lengths -> (B,) rewards to add."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_len - buffer
    soft = (start - lengths.float()) / buffer
    return penalty * torch.where(lengths <= start, torch.zeros_like(soft), soft.clamp(min=-1.0))


# --- losses -------------------------------------------------------------------------------------


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, T): GRPO eq. 4, Schulman's k3 estimator of KL(pi || pi_ref) per token:
    pi_ref / pi - log(pi_ref / pi) - 1, unbiased and always >= 0."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The importance ratio pi / pi_old: per token, (B, T) (GRPO eq. 3); or GSPO eq. 7,
    per sequence, s_i = exp(1 / |y_i| sum_t log(pi / pi_old)), (B, 1), the same for all of
    the sequence's tokens."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return torch.exp(log_ratio)
    return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))


def clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A): PPO eq. 7 with DAPO's
    decoupled range (eq. 10), as a loss; per token (ratio (B, T)) or per sequence (GSPO
    eq. 5, ratio (B, 1)). ``advantages`` (B,). Returns the (B, T or 1) loss and where the
    clipped branch was taken."""
    adv = advantages.unsqueeze(-1)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.max(loss1, loss2), loss2 > loss1


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int,
              denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token losses (B, T) -> the loss, by ``mode``:

    - ``seq-mean-token-mean`` (GRPO eq. 3): 1/G sum_i 1/|y_i| sum_t l_it;
    - ``token-mean`` (DAPO eq. 12): 1 / sum_i |y_i| sum_i sum_t l_it;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): 1/G sum_i sum_t l_it / L_max, a constant in
      place of |y_i|, so long wrong answers are not penalised less per token.

    ``denom`` replaces the local count (rows, or tokens for ``token-mean``) with the whole
    minibatch's over all ranks (:func:`rlhfkit.rlhf.minibatch.minibatch_updates`)."""
    if mode == "token-mean":
        return (token_loss * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    per_seq = (token_loss * mask).sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / max_len
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return per_seq.sum() / (max(per_seq.shape[0], 1) if denom is None else denom)


# --- merging generation rounds ------------------------------------------------------------------


def concat_experiences(parts: Sequence[Experience], pad_id: int) -> Experience:
    """The rows of several critic-free experiences in one, in order: prompts re-padded on
    the left to the widest prompt, responses on the right to the longest (the padding is
    masked out)."""
    if len(parts) == 1:
        return parts[0]
    P = max(e.rollout.prompt_width for e in parts)
    R = max(e.mask.shape[1] for e in parts)

    def widen(x: torch.Tensor, left: int, right: int, value: float = 0) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    rollouts, cols = [], []
    for e in parts:
        r, p, rr = e.rollout, e.rollout.prompt_width, e.mask.shape[1]
        left, right = P - p, R - rr
        rollouts.append((widen(r.input_ids, left, right, pad_id), widen(r.attention_mask, left, right),
                         widen(r.response_mask, 0, right), widen(r.logprobs, 0, right)))
        cols.append(tuple(widen(t, 0, right) for t in (e.logprobs, e.ref_logprobs, e.mask)))
    cat = lambda xs: torch.cat(list(xs))
    ids, attn, rmask, rlogp = map(cat, zip(*rollouts))
    logprobs, ref_logprobs, mask = map(cat, zip(*cols))
    rollout = Rollout(
        input_ids=ids, attention_mask=attn, prompt_width=P, response_mask=rmask, logprobs=rlogp,
        ended=cat(e.rollout.ended for e in parts), responses=[s for e in parts for s in e.rollout.responses],
        prompts=[s for e in parts for s in e.rollout.prompts],
    )
    timings = {k: sum(e.timings.get(k, 0.0) for e in parts) for k in parts[0].timings}
    return Experience(rollout, logprobs, ref_logprobs, cat(e.rm_scores for e in parts), cat(e.scores for e in parts),
                      None, mask, timings, parts[0].diagnostics)


# --- the algorithm ------------------------------------------------------------------------------


class GRPO:
    def __init__(self, cfg: GRPOConfig):
        if cfg.num_generations < 2:
            raise ConfigError("algorithm.num_generations must be >= 2: a group normalises its rewards by each other.")
        self.cfg = cfg
        self.kl = kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)

    def setup(self, ctx: RLContext) -> None:
        cfg = self.cfg
        self.ctx = ctx
        if cfg.dynamic_sampling and ctx.more_prompts is None:
            raise ConfigError("algorithm.dynamic_sampling=true needs a stream of extra prompts (RLContext.more_prompts), "
                              "which this RL stage does not provide; set algorithm.dynamic_sampling=false.")
        # minibatch shuffling draws from its own stream, so sampling's global RNG advances alike on every world size
        self.shuffle = torch.Generator().manual_seed(ctx.seed + 11)
        disable_dropout(ctx.policy.model)
        model = ctx.policy.model
        self.policy = ctx.backend.prepare(model, torch.optim.Adam(model.parameters(), lr=cfg.lr), None, cfg.max_grad_norm)

    def rewards(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rewards), (B,) each: the source's scores with the overlong penalty (DAPO
        eq. 13), and those minus the KL when it goes into the reward (k1 summed over the
        response, InstructGPT eq. 2)."""
        cfg = self.cfg
        scores = exp.scores + overlong_penalty(exp.mask.sum(-1), self.ctx.rollout.max_new_tokens,
                                               cfg.overlong_buffer, cfg.overlong_penalty)
        if cfg.kl_in == "reward":
            return scores, scores - self.kl.value * (per_token_kl(exp.logprobs, exp.ref_logprobs) * exp.mask).sum(-1)
        return scores, scores

    def sample_groups(self, prompts: Sequence[str]) -> tuple[Experience, torch.Tensor, dict[str, float]]:
        """This rank's groups of G responses to ``prompts`` (G adjacent copies of each, so a
        group never straddles ranks), scored, with their rewards.

        Dynamic sampling (DAPO eq. 11) keeps drawing whole batches of fresh prompts
        (``ctx.more_prompts``) while any group anywhere has identical scores, at most
        ``max_refill_rounds`` times. A group that needs replacing takes the group at the
        same position of the next round that has a spread: that group was generated on the
        same rank whatever the world size, so the trained batch, and the run, do not depend
        on the number of ranks, and every rank keeps the same number of rows (DAPO's recipe
        pools the kept groups instead, which needs rows to move between ranks). All ranks
        take the same decisions: the count of unfilled groups is all-reduced."""
        cfg, ctx, backend, G = self.cfg, self.ctx, self.ctx.backend, self.cfg.num_generations
        expand = lambda ps: [p for p in ps for _ in range(G)]
        exp = collect(ctx, expand(prompts), missing_eos_penalty=cfg.missing_eos_penalty)
        scores, rewards = self.rewards(exp)
        unfilled = zero_std_groups(scores, G)  # (n,) this rank's groups
        n = unfilled.shape[0]
        global_count = lambda x: int(backend.all_reduce_sum(x.float().sum().to(backend.device)).item())
        stats = {"grpo/zero_std_groups": unfilled.float().mean().item() if n else 0.0, "grpo/refill_rounds": 0.0}
        if not cfg.dynamic_sampling:
            return exp, rewards, stats
        parts, part_rewards = [exp], [rewards]
        source = torch.zeros(n, dtype=torch.long)  # which round fills each group
        rounds = 0
        while rounds < cfg.max_refill_rounds and global_count(unfilled) > 0:
            rounds += 1
            more = ctx.more_prompts()
            if len(more) != len(prompts):
                raise RuntimeError(f"more_prompts gave {len(more)} prompts, the step {len(prompts)}")
            new = collect(ctx, expand(more), missing_eos_penalty=cfg.missing_eos_penalty)
            new_scores, new_rewards = self.rewards(new)
            take = unfilled & ~zero_std_groups(new_scores, G)
            source[take] = rounds
            unfilled &= ~take
            parts.append(new)
            part_rewards.append(new_rewards)
        stats["grpo/refill_rounds"] = float(rounds)
        stats["grpo/unfilled_groups"] = unfilled.float().mean().item() if n else 0.0
        if rounds == 0:
            return exp, rewards, stats
        rows = (source * n * G).repeat_interleave(G) + torch.arange(n * G)  # row of each slot in the concatenation
        merged = concat_experiences(parts, ctx.policy.tokenizer.pad_token_id or 0).select(rows)
        return merged, torch.cat(part_rewards)[rows], stats

    def step(self, prompts: Sequence[str]) -> StepResult:
        cfg, ctx, backend, G = self.cfg, self.ctx, self.ctx.backend, self.cfg.num_generations
        per_step = minibatch_size(len(prompts), backend.world_size, cfg.num_minibatches)  # groups per minibatch, alike on every rank
        t0 = time.time()
        exp, rewards, sampling_stats = self.sample_groups(prompts)
        t_rollout = time.time() - t0
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards)  # (B,)
        kl = per_token_kl(exp.logprobs, exp.ref_logprobs) * exp.mask  # (B, R) k1, for the metrics and the guard
        per = "token" if cfg.loss_agg == "token-mean" else "row"
        stats: list[dict[str, float]] = []
        for _ in range(cfg.epochs):
            order = torch.randperm(exp.mask.shape[0], generator=self.shuffle)
            stats += minibatch_updates(exp, [self.policy], lambda m: self.loss(m, advantages[m.rows]), backend=backend,
                                       rows_per_minibatch=per_step * G, order=order,
                                       micro_batch_size=ctx.scoring.train_micro_batch_size, per=per)
        metrics = rollout_metrics(exp, kl, self.kl.value, t_rollout)
        global_kl = float(backend.all_reduce_mean(torch.tensor(metrics["rollout/kl"])))
        self.kl.update(global_kl, exp.mask.shape[0] * backend.world_size)
        metrics.update(mean_stats(stats))
        metrics.update(sampling_stats)
        metrics.update({"grpo/advantage_std": advantages.std().item(), "reward/total": rewards.mean().item(),
                        "perf/update_s": time.time() - t0 - t_rollout})
        return StepResult(metrics, kl=global_kl)

    def loss(self, m: MicroBatch, advantages: torch.Tensor):
        """The loss of one (trimmed) micro-batch; ``advantages`` (b,) are its rows'. GRPO eq.
        3 (or its variants): the clipped surrogate per token, plus beta times the k3 KL when
        the KL is in the loss, aggregated by ``loss_agg``."""
        cfg, ctx, sub = self.cfg, self.ctx, m.exp
        mask = sub.mask  # (b, R)
        with ctx.backend.autocast():
            logprobs, _ = response_logprobs(self.policy, sub.rollout, ctx.rollout.temperature)  # (b, R)
            ratio = importance_ratio(logprobs, sub.logprobs, mask, cfg.ratio_level)  # (b, R) or (b, 1)
            token_loss, clipped = clipped_objective(ratio, advantages, cfg.clip_eps_low, cfg.clip_eps_high)
            L = ctx.rollout.max_new_tokens
            pg_loss = aggregate(token_loss.expand_as(mask), mask, cfg.loss_agg, L, denom=m.denom)
            kl = k3_kl(logprobs, sub.ref_logprobs)  # (b, R)
            kl_loss = aggregate(kl, mask, cfg.loss_agg, L, denom=m.denom)  # aggregated like the surrogate
            loss = pg_loss + self.kl.value * kl_loss if cfg.kl_in == "loss" else pg_loss
        return [loss], {
            "loss/policy": pg_loss.item(), "loss/kl": kl_loss.item(), "loss/total": loss.item(),
            "grpo/clip_frac": masked_mean(clipped.expand_as(mask).float(), mask).item(),
            "grpo/kl": masked_mean(kl.detach(), mask).item(),  # k3 per token, under the current policy
            "grpo/ratio": masked_mean(ratio.detach().expand_as(mask), mask).item(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The KL controller and the minibatch shuffler. The engines are checkpointed by the
        pipeline; the prompt stream that dynamic sampling draws from is the ``rl`` stage's."""
        return {"kl": self.kl.state_dict(), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
        self.shuffle.set_state(state["shuffle"])


@hookimpl
def rlhfkit_register_algorithms(register):
    register("grpo", GRPO, GRPOConfig)
