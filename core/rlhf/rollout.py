"""Rollout + scoring shared by the RL algorithms: sample responses, then score them with
the policy (old logprobs), the frozen SFT reference, the reward model and (optionally) a
critic. Algorithms turn an :class:`Experience` into losses their own way."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Backend, RLContext, RolloutConfig
from rlhfkit.rlhf.logprobs import response_logprobs
from rlhfkit.rlhf.sampling import Rollout, draw_uniforms, sample


@dataclass
class Experience:
    rollout: Rollout
    logprobs: torch.Tensor  # (B, R) policy, at the rollout temperature
    ref_logprobs: torch.Tensor  # (B, R) frozen SFT policy
    rm_scores: torch.Tensor  # (B,) the reward source (reward=model: the reward model)
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    values: torch.Tensor | None  # (B, R) critic, or None for critic-free algorithms
    mask: torch.Tensor  # (B, R) float: response tokens up to and including EOS
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent generating and scoring (``generate``, ``score``)."""
    diagnostics: dict[str, float] = field(default_factory=dict)
    """Metrics of the rollout itself, under their logged names (``rollout/logprob_gap_max``)."""

    def select(self, idx: torch.Tensor) -> "Experience":
        return Experience(
            self.rollout.select(idx), self.logprobs[idx], self.ref_logprobs[idx], self.rm_scores[idx], self.scores[idx],
            None if self.values is None else self.values[idx], self.mask[idx], self.timings, self.diagnostics,
        )

    def trimmed(self) -> "Experience":
        """Without the padding columns all rows share (see :meth:`Rollout.trimmed`); the
        per-token tensors keep their first ``R'`` columns."""
        r = self.rollout.trimmed()
        R = r.response_mask.shape[1]
        return Experience(
            r, self.logprobs[:, :R], self.ref_logprobs[:, :R], self.rm_scores, self.scores,
            None if self.values is None else self.values[:, :R], self.mask[:, :R], self.timings, self.diagnostics,
        )


def buckets(lengths: torch.Tensor, size: int, max_rows: int | None = None) -> list[torch.Tensor]:
    """Row indices cut into micro-batches of at most ``size`` rows of similar length
    (sorted by length), so each micro-batch can be trimmed to its own longest row.

    ``max_rows``: the most rows any rank holds. The number of micro-batches is computed from
    it, so every rank runs the same number of forward passes (ZeRO-3 shards need that);
    a rank with fewer rows repeats its first row in an otherwise empty micro-batch."""
    n = lengths.shape[0]
    if size <= 0 or size >= max(n, max_rows or 0):
        return [torch.arange(n)]
    count = math.ceil(max(n, max_rows or 0) / size)
    order = torch.argsort(lengths.cpu(), stable=True)
    parts = list(torch.tensor_split(order, count))
    return [p if len(p) else order[:1] for p in parts]


def micro_batches(exp: Experience, rows: torch.Tensor, size: int) -> list[tuple[torch.Tensor, Experience]]:
    """This minibatch's rows as length-bucketed, trimmed micro-batches for gradient
    accumulation: (row indices into ``exp``, trimmed sub-experience)."""
    parts = buckets(exp.mask[rows].sum(-1), size)
    return [(rows[p], exp.select(rows[p]).trimmed()) for p in parts]


def _scored(fn: Callable[[Rollout], torch.Tensor], rollout: Rollout, size: int, max_rows: int, per_token: bool) -> torch.Tensor:
    """``fn`` over length-bucketed, trimmed micro-batches, scattered back to the rollout's
    rows: (B, R) for per-token outputs, (B,) otherwise."""
    B, R = rollout.response_mask.shape
    parts = buckets(rollout.attention_mask.sum(-1), size, max_rows)
    if len(parts) == 1 and len(parts[0]) == B:
        return fn(rollout).float()
    out = torch.zeros((B, R) if per_token else (B,), device=rollout.input_ids.device)
    seen = torch.zeros(B, dtype=torch.bool)
    for idx in parts:
        fresh = ~seen[idx]  # a padding micro-batch repeats a row: discard it
        v = fn(rollout.select(idx).trimmed()).float()
        idx, v = idx[fresh], v[fresh.to(v.device)]
        seen[idx] = True
        if per_token:
            out[idx.to(out.device), : v.shape[1]] = v
        else:
            out[idx.to(out.device)] = v
    return out


def policy_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(B, R) log pi(y_t | x, y_<t) of the sampled tokens."""
    return response_logprobs(model, rollout, temperature)[0]


def critic_values(critic: Callable[..., torch.Tensor], rollout: Rollout) -> torch.Tensor:
    """(B, R): V(x, y_<t), read at the position before each response token. ``critic`` is
    a reward model or the engine wrapping one."""
    values = critic(rollout.input_ids, rollout.attention_mask, per_token=True)  # (B, P + R)
    P, R = rollout.prompt_width, rollout.response_mask.shape[1]
    return values[:, P - 1 : P + R - 1]


HALF = (torch.bfloat16, torch.float16)


def reduced_precision(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s forward passes run below fp32 here: under a bf16/fp16 autocast
    (call it inside ``backend.autocast()``) or with half-precision weights."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in HALF:
        return True
    return any(p.dtype in HALF for p in model.parameters())


def logprob_gap(sampled: torch.Tensor, scored: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the sampler's logprobs are from a training-style pass's, in nats per token,
    over the valid positions: the noise a mismatch puts into the first PPO ratio and the KL."""
    gap = (sampled.float() - scored.float()).abs()[mask.bool()]
    if gap.numel() == 0:  # the same keys on every rank (metrics are averaged over ranks by key)
        gap = torch.zeros(1)
    return {"rollout/logprob_gap_max": gap.max().item(), "rollout/logprob_gap_mean": gap.mean().item()}


def check_rl_rollout(rollout: RolloutConfig) -> None:
    """RL scores every response under the policy's full softmax (old logprobs, PPO ratio,
    KL penalty); a sampler that truncates it with top-k/top-p would make those the
    logprobs of a policy that did not generate the data."""
    if rollout.top_k > 0 or rollout.top_p < 1.0:
        raise ConfigError(
            f"rollout.top_k={rollout.top_k} rollout.top_p={rollout.top_p}: RL must sample the distribution its PPO "
            "ratio and KL penalty score, the untruncated one. Set rollout.top_k=0 rollout.top_p=1.0 (a lower "
            "rollout.temperature sharpens sampling); top-k/top-p serve only runs without the rl stage.")


def any_alive_fn(backend: Backend) -> Callable[[bool], bool] | None:
    """For :func:`rlhfkit.rlhf.sampling.sample`: keep every rank decoding while any rank is,
    so sharded (ZeRO-3) forward passes stay in step. None on one process."""
    if backend.world_size == 1:
        return None
    return lambda alive: bool(backend.all_reduce_sum(torch.tensor(float(alive), device=backend.device)).item() > 0)


@torch.no_grad()
def collect(
    ctx: RLContext, prompts: Sequence[str], critic: torch.nn.Module | None = None,
    missing_eos_penalty: float | None = None,
) -> Experience:
    """Sample one response per prompt of this rank's share of the global batch
    ``prompts``, and score it. Sampling uniforms are drawn for the global batch, so the
    responses do not depend on the world size.

    The policy's logprobs are the sampling pass's own, or recomputed with a full forward
    pass (``ctx.scoring.recompute_logprobs``; by default under reduced precision). Either
    way the gap between the two is measured, on ``ctx.scoring.logprob_gap_rows`` rows if
    they are not recomputed, and returned in ``diagnostics``. The scoring passes (reference
    logprobs, rewards, values) run inference-only in length-bucketed micro-batches of
    ``ctx.scoring.score_micro_batch_size`` rows, each trimmed to its longest row."""
    check_rl_rollout(ctx.rollout)
    backend = ctx.backend
    uniforms = draw_uniforms(len(prompts), ctx.rollout.max_new_tokens)  # same on every rank
    mine = backend.shard(list(range(len(prompts))))
    max_rows = math.ceil(len(prompts) / backend.world_size)
    policy = ctx.policy.model
    was_training = policy.training
    policy.eval()
    generate = ctx.generate or sample
    T = ctx.rollout.temperature
    size = ctx.scoring.score_micro_batch_size
    t0 = time.perf_counter()
    with ctx.backend.autocast():
        rollout = generate(
            policy, ctx.policy.tokenizer, [prompts[i] for i in mine], ctx.rollout, backend.device,
            uniforms=uniforms[mine], any_alive=any_alive_fn(backend),
        )
        if not rollout.prompts:  # a third-party generator that does not fill them
            rollout.prompts = [prompts[i] for i in mine]
        t1 = time.perf_counter()
        recompute = ctx.scoring.recompute_logprobs
        if recompute is None:
            recompute = reduced_precision(policy, backend.device)
        diagnostics: dict[str, float] = {}
        if recompute:
            logprobs = _scored(lambda r: policy_logprobs(policy, r, T), rollout, size, max_rows, per_token=True)
            diagnostics = logprob_gap(rollout.logprobs, logprobs, rollout.response_mask)
        else:
            logprobs = rollout.logprobs.float()
            if ctx.scoring.logprob_gap_rows > 0 and mine:  # one pass on this rank's first rows (no RNG drawn)
                few = rollout.select(torch.arange(min(ctx.scoring.logprob_gap_rows, len(mine)))).trimmed()
                diagnostics = logprob_gap(few.logprobs, policy_logprobs(policy, few, T), few.response_mask)
        ref_logprobs = _scored(lambda r: policy_logprobs(ctx.reference.model, r, T), rollout, size, max_rows, per_token=True)
        rm_scores = _scored(ctx.reward, rollout, size, max_rows, per_token=False)  # the reward source's scores
        values = None
        if critic is not None:
            values = _scored(lambda r: critic_values(critic, r), rollout, size, max_rows, per_token=True)
    policy.train(was_training)
    timings = {"generate": t1 - t0, "score": time.perf_counter() - t1}
    scores = rm_scores.clone()
    if missing_eos_penalty is not None:
        # "N+ details": a truncated response gets a fixed low score instead of the RM's
        scores = torch.where(rollout.ended, scores, torch.full_like(scores, missing_eos_penalty))
    mask = rollout.response_mask.float()
    return Experience(rollout, logprobs * mask, ref_logprobs * mask, rm_scores, scores,
                      None if values is None else values * mask, mask, timings, diagnostics)


def rollout_metrics(exp: Experience, kl: torch.Tensor, kl_coef: float, rollout_seconds: float) -> dict[str, float]:
    """The metrics every RL algorithm reports about a rollout, under stable names.
    ``kl``: (B, R) per-token KL to the reference."""
    return {
        "reward/proxy": exp.rm_scores.mean().item(),
        "reward/score": exp.scores.mean().item(),
        "rollout/kl": kl.sum(-1).mean().item(),  # nats per response
        "rollout/eos_rate": exp.rollout.ended.float().mean().item(),
        "rollout/length": exp.mask.sum(-1).mean().item(),
        "kl_coef": kl_coef,
        "perf/tokens_per_s": exp.mask.sum().item() / max(rollout_seconds, 1e-9),
        "perf/rollout_s": rollout_seconds,
        **{f"perf/{k}_s": v for k, v in exp.timings.items()},
        **exp.diagnostics,
    }
