"""The InstructGPT run: SFT -> reward model -> RL, each stage handing a Hugging Face
checkpoint to the next. The loop orchestrates Protocols; the maths lives in plugins and in
the pure functions of :mod:`rlhfkit.rl`, :mod:`rlhfkit.losses` and :mod:`rlhfkit.sequences`.
"""

from __future__ import annotations

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
from rlhfkit.experience import any_alive_fn, policy_logprobs
from rlhfkit.interfaces import (
    Backend, Comparison, Dataset, Engine, Example, HeadBuilder, Policy, PolicyLoader, PreferenceOptimizer, RewardModel,
    RewardModelLoader, RLContext, RolloutConfig,
)
from rlhfkit.losses import comparison_pairs, kwise_loss, pairwise_loss
from rlhfkit.plugin_manager import Plugins
from rlhfkit.registry import Registry
from rlhfkit.secrets import redact
from rlhfkit.rl import cosine_schedule, dp_denominator, masked_sum
from rlhfkit.sequences import causal_lm_loss, encode_pairs, n_targets, pack, pad_rows, tokenize_pair


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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"rl.gradient_checkpointing=true, but {type(model).__name__} does not support it.")


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
    generator: Any

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
            generator=registry.build("generator", cfg.generator),
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
        backend = self.c.backend
        if backend.world_size > 1:  # ranks may disagree on ${now:...}: rank 0's directory wins
            self.run_dir = run_dir = backend.gather_objects([run_dir])[0]
        self.main = backend.is_main
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
        if self.main:
            self.hook.rlhfkit_log_metrics(stage=stage, step=step, metrics={k: float(v) for k, v in metrics.items()})

    def progress(self, stage: str, step: int, total: int) -> None:
        if self.main:
            self.hook.rlhfkit_progress(stage=stage, step=step, total=total)

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.c.backend.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = self.c.backend.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, values.tolist()))

    def save(self, stage: str, obj: Policy | RewardModel, state: Engine | PreferenceOptimizer | None = None) -> str:
        """Gather the (possibly sharded) weights on every rank, write a Hugging Face
        directory atomically on rank 0, and ``state``'s resumable training state beside it
        (``<stage>_state/``)."""
        path = os.path.join(self.run_dir, stage)
        module = getattr(obj, "model", obj)
        with self.c.backend.gathered(module):
            if self.main:
                with atomic_directory(path) as tmp:
                    obj.save(tmp)
        if state is not None:
            state.save_state(os.path.join(self.run_dir, f"{stage}_state"))
        self.c.backend.barrier()
        self.paths[stage] = path
        if self.main:
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
                    out += self.c.generator(policy.model, policy.tokenizer, flat[i : i + self.eval_cfg.batch_size], rollout,
                                            self.device, any_alive=any_alive_fn(self.c.backend)).responses
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
        engine = backend.prepare(model, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = _epochs(len(rows), cfg.batch_size, self.cfg.seed)
        t0, tokens = time.time(), 0
        for step in range(1, cfg.steps + 1):
            batch = backend.shard([rows[i] for i in next(batches)])  # this rank's share
            with backend.autocast():
                if cfg.packing:
                    p = pack(batch, cfg.pack_length, tok.pad_token_id, cfg.mask_prompt, self.device)
                    ids, kw, loss_mask = p.input_ids, dict(attention_mask=p.attention_mask, position_ids=p.position_ids), p.loss_mask
                else:
                    e = pad_rows(batch, tok.pad_token_id, self.device, cfg.mask_prompt)
                    ids, kw, loss_mask = e.input_ids, dict(attention_mask=e.attention_mask), e.loss_mask
                denom = dp_denominator(n_targets(loss_mask), backend.all_reduce_sum, backend.world_size)
                loss = causal_lm_loss(engine(input_ids=ids, **kw).logits, ids, loss_mask, denom=denom)
                tokens += int(ids.numel())
            engine.backward(loss)
            grad_norm = engine.step()
            self.progress("sft", step, cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log("sft", step, self.mean_over_ranks({
                    "loss/sft": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "perf/tokens_per_s": tokens / max(time.time() - t0, 1e-9) * backend.world_size,
                }))
        model.eval()
        self.save("sft", policy, engine)
        return policy

    def run_rm(self) -> RewardModel:
        cfg, backend = self.rm_cfg, self.c.backend
        seed_everything(self.cfg.seed + 1)
        # Each stage starts from the previous stage's checkpoint on disk: that is what a
        # stage run alone does, and the in-memory model may be sharded for training.
        sft_policy = self.c.policy.load(self.paths["sft"])
        sft_policy.model = backend.prepare_frozen(sft_policy.model)
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
        engine = backend.prepare(rm, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = _epochs(len(units), cfg.batch_size, self.cfg.seed + 1)
        for step in range(1, steps + 1):
            batch = backend.shard([units[i] for i in next(batches)])
            with backend.autocast():
                loss, acc = self._rm_loss(engine, tok, batch)
            engine.backward(loss)
            grad_norm = engine.step()
            self.progress("rm", step, steps)
            if step % cfg.log_every == 0 or step == steps:
                self.log("rm", step, self.mean_over_ranks(
                    {"loss/rm": loss.item(), "rm/train_accuracy": acc.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}))
        rm.eval()
        metrics = {"rm/accuracy": self.rm_accuracy(rm, tok, test)}
        if cfg.normalize:
            demos = self.c.dataset.sft_examples("train")[: self.eval_cfg.num_prompts]
            bias = self._mean_score(rm, tok, [d.prompt for d in demos], [d.response for d in demos])
            rm.set_bias(bias)
            metrics["rm/bias"] = bias
        self.log("rm", steps, metrics)
        self.save("rm", rm, engine)
        return rm

    def _rm_loss(self, model, tok, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss over this rank's share of the batch, normalised so that the average
        over ranks is the loss over the whole batch."""
        backend = self.c.backend
        if self.rm_cfg.loss == RMLoss.kwise:
            prompts = [c.prompt for c in batch for _ in c.responses]
            responses = [r for c in batch for r in c.responses]
            e = encode_pairs(tok, prompts, responses, self.device)
            rewards = model(e.input_ids, e.attention_mask)  # (sum K,) each completion once
            win, lose, group = comparison_pairs([c.scores for c in batch])
            n_with_pairs = float(len(set(group.tolist())))
            denom = dp_denominator(n_with_pairs, backend.all_reduce_sum, backend.world_size)
            return kwise_loss(rewards, win, lose, group, len(batch), denom=denom)
        prompts = [p for p, _, _ in batch] * 2
        e = encode_pairs(tok, prompts, [c for _, c, _ in batch] + [r for _, _, r in batch], self.device)
        rewards = model(e.input_ids, e.attention_mask)
        denom = dp_denominator(float(len(batch)), backend.all_reduce_sum, backend.world_size)
        return pairwise_loss(rewards[: len(batch)], rewards[len(batch) :], denom=denom)

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

    def run_rl(self) -> tuple[Policy, PreferenceOptimizer]:
        cfg, backend = self.rl_cfg, self.c.backend
        seed_everything(self.cfg.seed + 2)
        policy = self.c.policy.load(self.paths["sft"])
        reference = self.c.policy.load(self.paths["sft"])
        reference.model = backend.prepare_frozen(reference.model)
        # from disk, not the RM stage's object: under ZeRO-3 that one is sharded for training
        rm = backend.prepare_frozen(self.c.reward_model.load(self.paths["rm"], self.c.reward_head))
        demos = self.c.dataset.sft_examples("train")

        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy.model)

        def make_critic() -> RewardModel:
            critic = self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
            critic.requires_grad_(True)
            if cfg.gradient_checkpointing:
                enable_gradient_checkpointing(getattr(critic, "backbone", critic))
            return critic

        ctx = RLContext(
            policy=policy, reference=reference, reward_model=rm, backend=backend, rollout=cfg.rollout,
            total_steps=cfg.steps, make_critic=make_critic, sft_batches=_example_batches(demos, self.cfg.seed),
            generate=self.c.generator, scoring=cfg.scoring,
        )
        algorithm: PreferenceOptimizer = self.registry.build("algorithm", self.c.algorithm_node)
        algorithm.setup(ctx)
        prompts = self.c.dataset.prompts("train")
        batches = _epochs(len(prompts), cfg.prompts_per_step, self.cfg.seed + 2)
        eval_prompts = self.eval_prompts()
        for step in range(1, cfg.steps + 1):
            t0 = time.time()
            metrics = self.mean_over_ranks(algorithm.step([prompts[i] for i in next(batches)]))
            metrics["perf/step_s"] = time.time() - t0
            self.progress("rl", step, cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log("rl", step, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                result = self.evaluate(policy, reference, rm, eval_prompts)
                self.log("rl", step, {f"eval/{k}": v for k, v in result.metrics.items()})
        policy.model.eval()
        self.save("rl", policy, algorithm)
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
                r = self.c.generator(policy.model, policy.tokenizer, prompts[i : i + bs], rollout_cfg, self.device,
                                     any_alive=any_alive_fn(self.c.backend))
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
        loggers = self.c.loggers if self.main else []  # lifecycle hooks run on rank 0 only
        config = redact(OmegaConf.to_container(self.cfg, resolve=True))  # no credentials on disk or in logs
        if self.main:
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(config)))
        for i, lg in enumerate(loggers):
            self.plugins.register(lg, name=f"rlhfkit-run-logger-{id(self)}-{i}")
        summary: dict[str, Any] = {"status": "failed"}
        if self.main:
            self.hook.rlhfkit_run_start(run_dir=self.run_dir, config=config)
        try:
            summary = self._stages()
            summary["status"] = "ok"
        except BaseException as exc:
            summary["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self.main:
                self.hook.rlhfkit_run_end(run_dir=self.run_dir, summary=redact(summary))
            for lg in loggers:
                self.plugins.pm.unregister(lg)
        return summary

    def _stages(self) -> dict[str, Any]:
        stages = self.cfg.stages
        t0 = time.time()
        timings: dict[str, float] = {}
        if "sft" in stages:
            self.run_sft()
            timings["sft"] = time.time() - t0
        if "rm" in stages:
            t = time.time()
            self.run_rm()
            timings["rm"] = time.time() - t
        rl_policy = None
        if "rl" in stages:
            t = time.time()
            rl_policy, _ = self.run_rl()
            timings["rl"] = time.time() - t
        t = time.time()
        table = self.final_evaluation(rl_policy)
        timings["eval"] = time.time() - t
        table["seconds"] = {**timings, "total": time.time() - t0}
        if self.main:
            atomic_write_text(os.path.join(self.run_dir, "eval.json"), json.dumps(table, indent=2))
            print(format_table(table), flush=True)
        return table

    def final_evaluation(self, rl_policy: Policy | None) -> dict[str, Any]:
        """Evaluate the SFT policy and (if trained) the RL policy on the same held-out prompts."""
        # fresh from the checkpoints: the stages' own objects may be sharded for training
        sft = self.c.policy.load(self.paths["sft"])
        sft.model = self.c.backend.prepare_frozen(sft.model)
        rm = None
        if os.path.isdir(self.paths["rm"]):
            rm = self.c.backend.prepare_frozen(self.c.reward_model.load(self.paths["rm"], self.c.reward_head))
        prompts = self.eval_prompts()
        table: dict[str, Any] = {"num_prompts": len(prompts), "policies": {}}
        base = self.evaluate(sft, sft, rm, prompts)
        table["policies"]["sft"] = base.metrics
        self.log("eval", 0, {f"sft/{k}": v for k, v in base.metrics.items()})
        if self.main:
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
            if self.main:
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
