"""Held-out evaluation of a policy: gold reward (the dataset's labeller), proxy reward (the
reward source), KL to the SFT policy, EOS rate and length; and the run's final table."""

from __future__ import annotations

import math
import statistics
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlhfkit.interfaces import Backend, Generator, Labeller, Policy, RewardSource, RolloutConfig, optional
from rlhfkit.report import show_environment
from rlhfkit.rlhf.masked import masked_sum
from rlhfkit.rlhf.rollout import any_alive_fn, policy_logprobs

EVAL_STREAMS = {"sft": 0, "rl": 1}
"""Offsets of each evaluated policy's sampling seed; another stage's policy gets one from
its name (see :func:`stream_offset`)."""


def stream_offset(name: str) -> int:
    return EVAL_STREAMS.get(name, 2 + zlib.crc32(name.encode()) % 100_000)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    prompts: list[str]
    responses: list[str]
    gold: list[float] | None
    samples_per_prompt: int = 1
    """Samples of each prompt, adjacent in ``prompts``, ``responses`` and ``gold``."""

    def rows(self, n: int) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "response": r, **({"gold": g} if self.gold is not None else {})}
            for p, r, g in zip(self.prompts[:n], self.responses[:n], (self.gold or [None] * n)[:n])
        ]


@torch.no_grad()
def evaluate(policy: Policy, reference: Policy, reward: RewardSource | None, prompts: Sequence[str], *,
             generator: Generator, backend: Backend, rollout: RolloutConfig, batch_size: int, seed: int,
             stream: str, labeller: Labeller | None, samples_per_prompt: int = 1) -> EvalResult:
    """Mean gold reward, proxy reward, KL to ``reference`` and EOS rate of ``policy``'s samples,
    ``samples_per_prompt`` independent ones per prompt (adjacent in the result's rows), so
    the means estimate the policy's expected scores with less sampling noise; and the reward
    source's own metrics of scoring them (:meth:`RewardSource.metrics`: an ensemble's
    disagreement).

    Each ``stream`` (sft, rl, ...) samples from its own fixed seed: reproducible, and
    independent of the other policies'. Were the streams shared, inverse-CDF sampling would
    couple SFT's and RL's responses (the same uniforms pick the same tokens where the
    policies agree), and the win rate would not compare independent draws as InstructGPT's
    does. The global RNG is left as it was."""
    source_metrics = optional(reward, RewardSource, "metrics") if reward is not None else dict
    source_metrics()  # what the source measured before (the caller has read it): not these samples'
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    was_training = policy.model.training
    policy.model.eval()
    gen = torch.random.get_rng_state()
    torch.manual_seed(seed + 12345 + stream_offset(stream))
    responses, kls, proxies, ended = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        with backend.autocast():
            r = generator(policy.model, policy.tokenizer, prompts[i : i + batch_size], rollout, backend.device,
                          any_alive=any_alive_fn(backend))
            logp = policy_logprobs(policy.model, r, rollout.temperature)
            ref = policy_logprobs(reference.model, r, rollout.temperature)
            if reward is not None:
                proxies.append(reward(r).float())
        kls.append(masked_sum(logp - ref, r.response_mask.float(), dim=-1))
        ended.append(r.ended.float())
        responses += r.responses
    torch.random.set_rng_state(gen)
    policy.model.train(was_training)
    metrics = {"kl": float(torch.cat(kls).mean()), "eos_rate": float(torch.cat(ended).mean())}
    if reward is not None:
        metrics["proxy"] = float(torch.cat(proxies).mean())
        metrics |= source_metrics()  # e.g. an ensemble's disagreement on these samples
    gold = None
    if labeller is not None:
        gold = labeller.score(prompts, responses)
        metrics["gold"] = sum(gold) / len(gold)
        se = standard_error(prompt_means(gold, samples_per_prompt))
        if not math.isnan(se):
            metrics["gold_se"] = se  # how far sampling and the choice of prompts move ``gold``
    metrics["length"] = sum(len(x.split()) for x in responses) / len(responses)
    return EvalResult(metrics, list(prompts), responses, gold, samples_per_prompt)


def versus(result: EvalResult, base: EvalResult) -> dict[str, float]:
    """Win rate (ties count half), tie rate and gold improvement of ``result`` over
    ``base`` on the same prompts, under the gold labeller; with the improvement's standard
    error (:func:`paired_standard_error`)."""
    if base.gold is None or result.gold is None:
        return {}
    n = len(result.gold)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(result.gold, base.gold))
    ties = sum(a == b for a, b in zip(result.gold, base.gold))
    out = {"win_rate": wins / n, "tie_rate": ties / n}
    if "gold" in base.metrics:
        out["gold_improvement"] = result.metrics["gold"] - base.metrics["gold"]
        se = paired_standard_error(result.gold, base.gold, result.samples_per_prompt)
        if not math.isnan(se):  # one prompt: none (eval.json stays strict JSON)
            out["gold_improvement_se"] = se
    return out


def prompt_means(scores: Sequence[float], samples_per_prompt: int = 1) -> list[float]:
    """The mean score of each prompt's ``samples_per_prompt`` adjacent samples."""
    k = samples_per_prompt
    return [sum(scores[i : i + k]) / k for i in range(0, len(scores), k)]


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (one per prompt); NaN with fewer than 2."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def paired_standard_error(gold: Sequence[float], base: Sequence[float], samples_per_prompt: int = 1) -> float:
    """Standard error of ``mean(gold) - mean(base)``, two policies' gold scores on the same
    prompts (``samples_per_prompt`` adjacent samples of each): the spread over prompts of
    the per-prompt difference of means, over the square root of the number of prompts. It
    counts both the sampling noise and which prompts were drawn; an improvement within about
    two of it is not one the evaluation can tell from zero. NaN with fewer than 2 prompts."""
    return standard_error([a - b for a, b in zip(prompt_means(gold, samples_per_prompt),
                                                 prompt_means(base, samples_per_prompt))])


def format_table(table: dict[str, Any]) -> str:
    cols = ["gold", "proxy", "kl", "eos_rate", "length"]
    samples = f" x {table['samples_per_prompt']} samples" if table.get("samples_per_prompt", 1) > 1 else ""
    lines = [f"\nEvaluation on {table['num_prompts']} held-out prompts{samples}", f"{'policy':<8}" + "".join(f"{c:>10}" for c in cols)]
    for name, m in table["policies"].items():
        lines.append(f"{name:<8}" + "".join(f"{m[c]:>10.3f}" if c in m else f"{'-':>10}" for c in cols))
    trained = [n for n in table["policies"] if n != "sft"]
    versus = table.get("versus_sft") or ({trained[0]: table} if "win_rate" in table and trained else {})
    for name, vs in versus.items():
        lines.append(
            f"{name.upper()} vs SFT under the gold labeller: win rate {vs['win_rate']:.3f} "
            f"(ties {vs['tie_rate']:.3f} count half), gold reward {vs['gold_improvement']:+.3f}"
            + (f" (standard error {vs['gold_improvement_se']:.3f})" if "gold_improvement_se" in vs else "")
        )
    if "seconds" in table:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in table["seconds"].items()))
    if "environment" in table:
        lines.append("environment: " + show_environment(table["environment"]))
    return "\n".join(lines)
