"""The InstructGPT run: SFT -> reward model -> RL, each stage handing a Hugging Face
checkpoint to the next. The loop orchestrates Protocols; the maths lives in plugins and in
the pure functions of :mod:`rlhfkit.rl`, :mod:`rlhfkit.losses` and :mod:`rlhfkit.sequences`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from rlhfkit.checkpoint import atomic_directory, atomic_write_text
from rlhfkit.config import STAGES, EvalConfig, RLConfig, RMConfig, RMLoss, SFTConfig
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.experience import policy_logprobs
from rlhfkit.interfaces import (
    Backend, Comparison, Dataset, Example, HeadBuilder, Policy, PolicyLoader, PreferenceOptimizer, RewardModel,
    RewardModelLoader, RLContext, RolloutConfig,
)
from rlhfkit.losses import comparison_pairs, kwise_loss, pairwise_loss
from rlhfkit.plugin_manager import Plugins
from rlhfkit.registry import Registry
from rlhfkit.rl import cosine_schedule, masked_sum
from rlhfkit.sequences import causal_lm_loss, encode_pairs, pack, pad_rows, sample, tokenize_pair


def find_checkpoint(run_dir: str, stage: str, max_depth: int = 8) -> str | None:
    """``run_dir/stage``, or, if that run took the stage from its own ``from_run``, the
    checkpoint found there (so single-stage runs chain: sft in A, rm in B, rl in C)."""
    for _ in range(max_depth):
        path = os.path.join(run_dir, stage)
        if os.path.isdir(path):
            return path
        try:
            run_dir = OmegaConf.load(os.path.join(run_dir, "config.yaml")).get("from_run")
        except FileNotFoundError:
            return None
        if not run_dir:
            return None
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


@dataclass
class Components:
    """Everything a run is built from, each made by its plugin from its own config slice."""

    backend: Backend
    dataset: Dataset
    policy: PolicyLoader
    reward_model: RewardModelLoader
    reward_head: HeadBuilder
    algorithm_node: Any  # built at the RL stage: a fresh optimizer per run
    loggers: list[Any]

    @classmethod
    def build(cls, cfg: DictConfig, registry: Registry) -> Components:
        loggers = [registry.build("logger", node) for node in (cfg.logger or {}).values()]
        registry.config_of("algorithm", cfg.algorithm)  # fail early on a bad algorithm config
        return cls(
            backend=registry.build("backend", cfg.backend),
            dataset=registry.build("data", cfg.data),
            policy=registry.build("policy", cfg.policy),
            reward_model=registry.build("reward_model", cfg.reward_model),
            reward_head=registry.build("reward_head", cfg.reward_head),
            algorithm_node=cfg.algorithm,
            loggers=loggers,
        )


class Run:
    """One pipeline run in ``run_dir``."""

    def __init__(self, cfg: DictConfig, registry: Registry, plugins: Plugins, run_dir: str):
        self.cfg, self.registry, self.plugins, self.run_dir = cfg, registry, plugins, run_dir
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown or not cfg.stages:
            raise ConfigError(f"stages={list(cfg.stages)}: each must be one of {list(STAGES)}.")
        self.sft_cfg: SFTConfig = OmegaConf.to_object(cfg.sft)
        self.rm_cfg: RMConfig = OmegaConf.to_object(cfg.rm)
        self.rl_cfg: RLConfig = OmegaConf.to_object(cfg.rl)
        self.eval_cfg: EvalConfig = OmegaConf.to_object(cfg.eval)
        self.c = Components.build(cfg, registry)
        self.hook = plugins.pm.hook
        self.paths = {s: os.path.join(run_dir, s) for s in STAGES}
        # A stage not run here takes its checkpoint from from_run: SFT feeds everything
        # (the final evaluation compares against it), the RM feeds RL.
        needed = {"sft"} | ({"rm"} if "rl" in cfg.stages else set())
        for stage in [s for s in STAGES if s in needed and s not in cfg.stages]:
            src = find_checkpoint(str(cfg.from_run), stage) if cfg.from_run else None
            if src is None:
                raise CheckpointError(
                    f"Stage '{stage}' is not in stages={list(cfg.stages)}, so its checkpoint comes from "
                    f"from_run, but " + (f"{cfg.from_run!r} has no '{stage}' checkpoint" if cfg.from_run else "from_run is not set")
                    + f". Set from_run=<a run directory with a '{stage}' checkpoint>, or add '{stage}' to stages."
                )
            self.paths[stage] = src

    # -- helpers ------------------------------------------------------------------------

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self.hook.rlhfkit_log_metrics(stage=stage, step=step, metrics={k: float(v) for k, v in metrics.items()})

    def save(self, stage: str, obj: Policy | RewardModel) -> str:
        path = os.path.join(self.run_dir, stage)
        with atomic_directory(path) as tmp:
            obj.save(tmp)
        self.paths[stage] = path
        self.hook.rlhfkit_checkpoint_saved(stage=stage, path=path)
        return path

    @property
    def device(self) -> torch.device:
        return self.c.backend.device

    def sampler(self, policy: Policy, rollout: RolloutConfig):
        """sample(prompts, n) -> n completions per prompt, in eval-sized batches."""

        def sample_fn(prompts: Sequence[str], n: int) -> list[list[str]]:
            flat = [p for p in prompts for _ in range(n)]
            out: list[str] = []
            for i in range(0, len(flat), self.eval_cfg.batch_size):
                with self.c.backend.autocast():
                    out += sample(policy.model, policy.tokenizer, flat[i : i + self.eval_cfg.batch_size], rollout, self.device).responses
            return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

        return sample_fn

    # -- stages ---------------------------------------------------------------------------

    def run_sft(self) -> Policy:
        cfg, backend = self.sft_cfg, self.c.backend
        seed_everything(self.cfg.seed)
        policy = self.c.policy.build(self.c.dataset)
        examples = self.c.dataset.sft_examples("train")
        if not examples:
            raise ConfigError("The dataset has no SFT demonstrations (train split).")
        tok = policy.tokenizer
        rows = [tokenize_pair(tok, e.prompt, e.response) for e in examples]
        model = policy.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        engine = backend.prepare(model, optimizer, scheduler, cfg.max_grad_norm)
        batches = _epochs(len(rows), cfg.batch_size, self.cfg.seed)
        t0, tokens = time.time(), 0
        for step in range(1, cfg.steps + 1):
            batch = [rows[i] for i in next(batches)]
            with backend.autocast():
                if cfg.packing:
                    p = pack(batch, cfg.pack_length, tok.pad_token_id, cfg.mask_prompt, self.device)
                    logits = engine(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids).logits
                    loss = causal_lm_loss(logits, p.input_ids, p.loss_mask)
                    tokens += int(p.position_ids.numel())
                else:
                    e = pad_rows(batch, tok.pad_token_id, self.device, cfg.mask_prompt)
                    logits = engine(input_ids=e.input_ids, attention_mask=e.attention_mask).logits
                    loss = causal_lm_loss(logits, e.input_ids, e.loss_mask)
                    tokens += int(e.input_ids.numel())
            engine.backward(loss)
            grad_norm = engine.step()
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log("sft", step, {
                    "loss/sft": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "perf/tokens_per_s": tokens / max(time.time() - t0, 1e-9),
                })
        model.eval()
        self.save("sft", policy)
        return policy

    def run_rm(self, sft_policy: Policy | None) -> RewardModel:
        cfg, backend = self.rm_cfg, self.c.backend
        seed_everything(self.cfg.seed + 1)
        sft_policy = sft_policy or self.c.policy.load(self.paths["sft"])
        backend.prepare_frozen(sft_policy.model)
        sampler = self.sampler(sft_policy, self.rl_cfg.rollout)
        train = self.c.dataset.comparisons("train", sampler)
        test = self.c.dataset.comparisons("test", sampler)
        if not train:
            raise ConfigError("The dataset has no comparisons for the reward model (train split).")
        tok = sft_policy.tokenizer
        rm = self.c.reward_model.build(self.paths["sft"], self.c.reward_head)
        optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        units = train if cfg.loss == RMLoss.kwise else _as_pairs(train)
        steps = cfg.epochs * math.ceil(len(units) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, steps, cfg.min_lr_ratio))
        engine = backend.prepare(rm, optimizer, scheduler, cfg.max_grad_norm)
        batches = _epochs(len(units), cfg.batch_size, self.cfg.seed + 1)
        for step in range(1, steps + 1):
            batch = [units[i] for i in next(batches)]
            with backend.autocast():
                loss, acc = self._rm_loss(engine, tok, batch)
            engine.backward(loss)
            grad_norm = engine.step()
            if step % cfg.log_every == 0 or step == steps:
                self.log("rm", step, {"loss/rm": loss.item(), "rm/train_accuracy": acc.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm})
        rm.eval()
        metrics = {"rm/accuracy": self.rm_accuracy(rm, tok, test)}
        if cfg.normalize:
            demos = self.c.dataset.sft_examples("train")[: self.eval_cfg.num_prompts]
            bias = self._mean_score(rm, tok, [d.prompt for d in demos], [d.response for d in demos])
            rm.set_bias(bias)
            metrics["rm/bias"] = bias
        self.log("rm", steps, metrics)
        self.save("rm", rm)
        return rm

    def _rm_loss(self, model, tok, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rm_cfg.loss == RMLoss.kwise:
            prompts = [c.prompt for c in batch for _ in c.responses]
            responses = [r for c in batch for r in c.responses]
            e = encode_pairs(tok, prompts, responses, self.device)
            rewards = model(e.input_ids, e.attention_mask)  # (sum K,) each completion once
            win, lose, group = comparison_pairs([c.scores for c in batch])
            return kwise_loss(rewards, win, lose, group, len(batch))
        prompts = [p for p, _, _ in batch] * 2
        e = encode_pairs(tok, prompts, [c for _, c, _ in batch] + [r for _, _, r in batch], self.device)
        rewards = model(e.input_ids, e.attention_mask)
        return pairwise_loss(rewards[: len(batch)], rewards[len(batch) :])

    @torch.no_grad()
    def _scores(self, rm: RewardModel, tok, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        bs = self.eval_cfg.batch_size
        for i in range(0, len(prompts), bs):
            e = encode_pairs(tok, prompts[i : i + bs], responses[i : i + bs], self.device)
            with self.c.backend.autocast():
                out.append(rm(e.input_ids, e.attention_mask).float())
        return torch.cat(out)

    def _mean_score(self, rm, tok, prompts, responses) -> float:
        return float(self._scores(rm, tok, prompts, responses).mean() + rm.bias)

    def rm_accuracy(self, rm: RewardModel, tok, comparisons: Sequence[Comparison]) -> float:
        """Held-out accuracy: fraction of strictly ordered pairs the RM orders the same way."""
        if not comparisons:
            return float("nan")
        prompts = [c.prompt for c in comparisons for _ in c.responses]
        responses = [r for c in comparisons for r in c.responses]
        rewards = self._scores(rm, tok, prompts, responses)
        win, lose, _ = comparison_pairs([c.scores for c in comparisons])
        return float((rewards[win] > rewards[lose]).float().mean())

    def run_rl(self, rm: RewardModel | None) -> tuple[Policy, PreferenceOptimizer]:
        cfg, backend = self.rl_cfg, self.c.backend
        seed_everything(self.cfg.seed + 2)
        policy = self.c.policy.load(self.paths["sft"])
        reference = self.c.policy.load(self.paths["sft"])
        backend.prepare_frozen(reference.model)
        rm = rm if rm is not None else self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
        backend.prepare_frozen(rm)
        demos = self.c.dataset.sft_examples("train")

        def make_critic() -> RewardModel:
            critic = copy.deepcopy(rm)
            critic.requires_grad_(True)
            return critic

        ctx = RLContext(
            policy=policy, reference=reference, reward_model=rm, backend=backend, rollout=cfg.rollout,
            total_steps=cfg.steps, make_critic=make_critic, sft_batches=_example_batches(demos, self.cfg.seed),
        )
        algorithm: PreferenceOptimizer = self.registry.build("algorithm", self.c.algorithm_node)
        algorithm.setup(ctx)
        prompts = self.c.dataset.prompts("train")
        batches = _epochs(len(prompts), cfg.prompts_per_step, self.cfg.seed + 2)
        eval_prompts = self.eval_prompts()
        for step in range(1, cfg.steps + 1):
            t0 = time.time()
            metrics = algorithm.step([prompts[i] for i in next(batches)])
            metrics["perf/step_s"] = time.time() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log("rl", step, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                result = self.evaluate(policy, reference, rm, eval_prompts)
                self.log("rl", step, {f"eval/{k}": v for k, v in result.metrics.items()})
        policy.model.eval()
        self.save("rl", policy)
        return policy, algorithm

    # -- evaluation -----------------------------------------------------------------------

    def eval_prompts(self) -> list[str]:
        return self.c.dataset.prompts("test")[: self.eval_cfg.num_prompts]

    @torch.no_grad()
    def evaluate(self, policy: Policy, reference: Policy, rm: RewardModel | None, prompts: Sequence[str]) -> "EvalResult":
        """Mean gold reward, proxy (RM) reward, KL to SFT and EOS rate of ``policy``'s samples."""
        rollout_cfg = self.rl_cfg.rollout
        was_training = policy.model.training
        policy.model.eval()
        gen = torch.random.get_rng_state()
        torch.manual_seed(self.cfg.seed + 12345)  # every policy is scored on the same draws
        responses, kls, proxies, ended = [], [], [], []
        bs = self.eval_cfg.batch_size
        for i in range(0, len(prompts), bs):
            with self.c.backend.autocast():
                r = sample(policy.model, policy.tokenizer, prompts[i : i + bs], rollout_cfg, self.device)
                logp = policy_logprobs(policy.model, r, rollout_cfg.temperature)
                ref = policy_logprobs(reference.model, r, rollout_cfg.temperature)
                if rm is not None:
                    proxies.append(rm(r.input_ids, r.attention_mask).float())
            kls.append(masked_sum(logp - ref, r.response_mask.float(), dim=-1))
            ended.append(r.ended.float())
            responses += r.responses
        torch.random.set_rng_state(gen)
        policy.model.train(was_training)
        metrics = {"kl": float(torch.cat(kls).mean()), "eos_rate": float(torch.cat(ended).mean())}
        if rm is not None:
            metrics["proxy"] = float(torch.cat(proxies).mean())
        gold = None
        labeller = self.c.dataset.labeller
        if labeller is not None:
            gold = labeller.score(prompts, responses)
            metrics["gold"] = sum(gold) / len(gold)
        metrics["length"] = sum(len(x.split()) for x in responses) / len(responses)
        return EvalResult(metrics, list(prompts), responses, gold)

    # -- the whole run ----------------------------------------------------------------------

    def __call__(self) -> dict[str, Any]:
        os.makedirs(self.run_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.run_dir, "config.yaml"), OmegaConf.to_yaml(self.cfg, resolve=True))
        for i, lg in enumerate(self.c.loggers):
            self.plugins.register(lg, name=f"rlhfkit-run-logger-{id(self)}-{i}")
        summary: dict[str, Any] = {"status": "failed"}
        self.hook.rlhfkit_run_start(run_dir=self.run_dir, config=OmegaConf.to_container(self.cfg, resolve=True))
        try:
            summary = self._stages()
            summary["status"] = "ok"
        except BaseException as exc:
            summary["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.hook.rlhfkit_run_end(run_dir=self.run_dir, summary=summary)
            for lg in self.c.loggers:
                self.plugins.pm.unregister(lg)
        return summary

    def _stages(self) -> dict[str, Any]:
        stages, sft, rm = self.cfg.stages, None, None
        t0 = time.time()
        timings: dict[str, float] = {}
        if "sft" in stages:
            sft = self.run_sft()
            timings["sft"] = time.time() - t0
        if "rm" in stages:
            t = time.time()
            rm = self.run_rm(sft)
            timings["rm"] = time.time() - t
        rl_policy = None
        if "rl" in stages:
            t = time.time()
            rl_policy, _ = self.run_rl(rm)
            timings["rl"] = time.time() - t
        t = time.time()
        table = self.final_evaluation(sft, rm, rl_policy)
        timings["eval"] = time.time() - t
        table["seconds"] = {**timings, "total": time.time() - t0}
        atomic_write_text(os.path.join(self.run_dir, "eval.json"), json.dumps(table, indent=2))
        print(format_table(table), flush=True)
        return table

    def final_evaluation(self, sft: Policy | None, rm: RewardModel | None, rl_policy: Policy | None) -> dict[str, Any]:
        """Evaluate the SFT policy and (if trained) the RL policy on the same held-out prompts."""
        if sft is None:
            sft = self.c.policy.load(self.paths["sft"])
        self.c.backend.prepare_frozen(sft.model)
        if rm is None and os.path.isdir(self.paths["rm"]):
            rm = self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
        if rm is not None:
            self.c.backend.prepare_frozen(rm)
        prompts = self.eval_prompts()
        table: dict[str, Any] = {"num_prompts": len(prompts), "policies": {}}
        base = self.evaluate(sft, sft, rm, prompts)
        table["policies"]["sft"] = base.metrics
        self.log("eval", 0, {f"sft/{k}": v for k, v in base.metrics.items()})
        self.hook.rlhfkit_log_samples(stage="sft", step=0, rows=base.rows(self.eval_cfg.num_samples_logged))
        if rl_policy is not None:
            res = self.evaluate(rl_policy, sft, rm, prompts)
            table["policies"]["rl"] = res.metrics
            if base.gold is not None and res.gold is not None:
                wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(res.gold, base.gold))
                ties = sum(a == b for a, b in zip(res.gold, base.gold))
                table["win_rate"] = wins / len(prompts)
                table["tie_rate"] = ties / len(prompts)
                if "gold" in base.metrics:
                    table["gold_improvement"] = res.metrics["gold"] - base.metrics["gold"]
            self.log("eval", 0, {f"rl/{k}": v for k, v in res.metrics.items()} | {
                k: table[k] for k in ("win_rate", "tie_rate", "gold_improvement") if k in table})
            self.hook.rlhfkit_log_samples(stage="rl", step=0, rows=res.rows(self.eval_cfg.num_samples_logged))
        return table


@dataclass
class EvalResult:
    metrics: dict[str, float]
    prompts: list[str]
    responses: list[str]
    gold: list[float] | None

    def rows(self, n: int) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "response": r, **({"gold": g} if self.gold is not None else {})}
            for p, r, g in zip(self.prompts[:n], self.responses[:n], (self.gold or [None] * n)[:n])
        ]


def format_table(table: dict[str, Any]) -> str:
    cols = ["gold", "proxy", "kl", "eos_rate", "length"]
    lines = [f"\nEvaluation on {table['num_prompts']} held-out prompts", f"{'policy':<8}" + "".join(f"{c:>10}" for c in cols)]
    for name, m in table["policies"].items():
        lines.append(f"{name:<8}" + "".join(f"{m[c]:>10.3f}" if c in m else f"{'-':>10}" for c in cols))
    if "win_rate" in table:
        lines.append(
            f"RL vs SFT under the gold labeller: win rate {table['win_rate']:.3f} "
            f"(ties {table['tie_rate']:.3f} count half), gold reward {table['gold_improvement']:+.3f}"
        )
    if "seconds" in table:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in table["seconds"].items()))
    return "\n".join(lines)


def _epochs(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled batches of indices, reshuffled every epoch, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def _example_batches(examples: list[Example], seed: int, batch_size: int = 32) -> Iterator[list[Example]]:
    for idx in _epochs(len(examples), batch_size, seed + 7):
        yield [examples[i] for i in idx]


def _as_pairs(comparisons: Sequence[Comparison]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for every strictly ordered pair."""
    out = []
    for c in comparisons:
        for i, j in itertools.combinations(range(len(c.responses)), 2):
            if c.scores[i] != c.scores[j]:
                a, b = (i, j) if c.scores[i] > c.scores[j] else (j, i)
                out.append((c.prompt, c.responses[a], c.responses[b]))
    return out
