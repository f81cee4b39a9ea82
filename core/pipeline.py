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
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from rlhfkit.checkpoint import (
    CheckpointStore, atomic_directory, atomic_write_text, load_tensors, no_space_message, remove_temporaries, verify,
    write_manifest,
)
from rlhfkit.data import DataIssues, context_length, describe
from rlhfkit.config import STAGES, CheckpointConfig, EvalConfig, GuardConfig, OnDivergence, RLConfig, RMConfig, RMLoss, SFTConfig, validate_run
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import (
    Backend, Comparison, Dataset, HeadBuilder, Policy, PolicyLoader, PreferenceOptimizer, RewardModel,
    RewardModelLoader, RLContext, RolloutConfig,
)
from rlhfkit.plugin_manager import Plugins
from rlhfkit.registry import Registry
from rlhfkit.resume import Batches, DivergenceError, Guard, Preemption, TrackingBackend, rng_state, set_rng_state
from rlhfkit.secrets import redact
from rlhfkit.rlhf.losses import causal_lm_loss, comparison_pairs, kwise_loss, n_targets, pairwise_loss
from rlhfkit.rlhf.masked import dp_denominator, masked_sum
from rlhfkit.rlhf.packing import pack
from rlhfkit.rlhf.retokenize import Retokenized, same_vocabulary
from rlhfkit.rlhf.rollout import any_alive_fn, policy_logprobs
from rlhfkit.rlhf.schedule import cosine_schedule
from rlhfkit.rlhf.tokenize import encode_pairs, pad_rows, tokenize_pair


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
        validate_run(cfg, registry)  # the CLI did this before Hydra made the run directory; API callers get it here
        self.sft_cfg: SFTConfig = OmegaConf.to_object(cfg.sft)
        self.rm_cfg: RMConfig = OmegaConf.to_object(cfg.rm)
        self.rl_cfg: RLConfig = OmegaConf.to_object(cfg.rl)
        self.eval_cfg: EvalConfig = OmegaConf.to_object(cfg.eval)
        self.ckpt_cfg: CheckpointConfig = OmegaConf.to_object(cfg.checkpoint)
        self.guard_cfg: GuardConfig = OmegaConf.to_object(cfg.guard)
        resume = cfg.get("resume", False)
        if isinstance(resume, str) and resume.lower() not in ("true", "false", ""):
            run_dir = resume  # resume=<run dir>: continue that run there
        self.resuming = bool(resume) and str(resume).lower() != "false"
        if self.resuming and not os.path.isfile(os.path.join(run_dir, "config.yaml")):
            raise CheckpointError(f"resume: {run_dir!r} is not an rlhfkit run directory (no config.yaml). "
                                  "Pass resume=<the run directory to continue>.")
        self.run_dir = run_dir
        self.c = Components.build(cfg, registry)
        backend = self.c.backend
        if backend.world_size > 1:  # ranks may disagree on ${now:...}: rank 0's directory wins
            self.run_dir = run_dir = backend.gather_objects([run_dir])[0]
        self.main = backend.is_main
        self.store = CheckpointStore(
            run_dir, self.ckpt_cfg.keep_last, self.main,
            share=(lambda x: backend.gather_objects([x])[0]) if backend.world_size > 1 else (lambda x: x),
            barrier=backend.barrier,
        )
        self.preemption = Preemption()
        self.issues = DataIssues(cfg.get("bad_data", "error"))  # the pipeline's own checks (context length)
        self.context: int | None = None  # the policy's context length, once a stage has loaded it
        self.rm_context: int | None = None  # the reward model's
        self._reported: dict[str, int] = {}
        self.hook = plugins.pm.hook
        self.paths = {s: os.path.join(run_dir, s) for s in STAGES}
        # A stage not run here takes its checkpoint from from_run: SFT feeds everything
        # (the final evaluation compares against it), the RM feeds RL.
        needed = {"sft"} | ({"rm"} if "rl" in cfg.stages else set())
        for stage in [s for s in STAGES if s in needed and s not in cfg.stages]:
            pretrained = getattr(self.c.reward_model, "pretrained_path", None) if stage == "rm" else None
            if pretrained and not cfg.from_run:  # a reward model trained elsewhere (reward_model=seq_cls)
                self.paths[stage] = pretrained
                continue
            src = find_checkpoint(str(cfg.from_run), stage) if cfg.from_run else None
            if src is None:
                raise CheckpointError(
                    f"Stage '{stage}' is not in stages={list(cfg.stages)}, so its checkpoint comes from "
                    f"from_run, but " + (f"{cfg.from_run!r} has no '{stage}' checkpoint" if cfg.from_run else "from_run is not set")
                    + f". Set from_run=<a run directory with a '{stage}' checkpoint>, or add '{stage}' to stages."
                )
            self.paths[stage] = src
        for stage in [s for s in STAGES if s in needed and s not in cfg.stages]:
            self.check_product(stage, self.paths[stage])

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

    def save(self, stage: str, obj: Policy | RewardModel) -> str:
        """Gather the (possibly sharded) weights on every rank and write a Hugging Face
        directory with a manifest, atomically, on rank 0: the stage's product."""
        path = os.path.join(self.run_dir, stage)
        module = getattr(obj, "model", obj)
        with self.c.backend.gathered(module):
            if self.main:
                with atomic_directory(path, on_no_space=lambda: self.no_space(stage)) as tmp:
                    obj.save(tmp)
                    write_manifest(tmp, stage=stage, kind="stage")
        self.c.backend.barrier()
        self.paths[stage] = path
        if self.main:
            self.hook.rlhfkit_checkpoint_saved(stage=stage, path=path)
        return path

    def no_space(self, stage: str) -> CheckpointError:
        return CheckpointError(no_space_message(self.run_dir, self.store.latest(stage, lambda _: None), self.run_dir))

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

    # -- checkpoints, resume, guards ------------------------------------------------------

    def warn(self, message: str) -> None:
        if self.main:
            print(f"rlhfkit: warning: {message}", file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        if self.main:
            print(f"rlhfkit: {message}", flush=True)

    def train_loop(self, stage: str, total: int, log_every: int, step_fn: Callable[[int], dict[str, float]],
                   tracked: TrackingBackend, state: dict[str, Any]) -> None:
        """Run ``step_fn(step)`` (one optimizer step, returning this rank's metrics) for
        steps 1..``total``: resuming from the stage's last good checkpoint, checkpointing
        every ``checkpoint.every`` steps, guarding against divergence, and checkpointing
        then raising :class:`Preempted` on SIGTERM or Ctrl-C. ``state`` holds what besides the
        engines and RNGs must be restored (data positions, the algorithm)."""
        gc, every = self.guard_cfg, self.ckpt_cfg.every
        guard = Guard(gc.max_bad_steps, gc.kl_bound if stage == "rl" else None)
        step = 0
        if self.resuming:
            step = self.resume_stage(stage, tracked, state, guard)
        while step < total:
            step += 1
            before = tracked.skipped_steps()
            metrics = step_fn(step)
            reasons = guard.check(step, tracked.skipped_steps() - before, metrics)
            self.progress(stage, step, total)
            if step % log_every == 0 or step == total or reasons:
                self.log(stage, step, self.mean_over_ranks(metrics) | guard.metrics())
            if reasons:
                self.warn(f"[{stage}] bad step {step} ({guard.consecutive} in a row): {'; '.join(reasons)}")
            if guard.tripped:
                step = self.rollback(stage, step, tracked, state, guard)
                continue
            preempted = self.c.backend.any_rank(self.preemption.requested)
            if step < total and ((every and step % every == 0 and not guard.consecutive) or preempted):
                self.save_training(stage, step, tracked, state, guard)
            if preempted and step < total:
                raise self.preemption.stopped(f"stopped {stage} at step {step}/{total} after writing "
                                              f"{self.store.path(stage, step)}. Continue with: rlhfkit resume={self.run_dir}")

    def save_training(self, stage: str, step: int, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> str:
        rank = self.c.backend.rank

        def write(tmp: str) -> None:
            for i, engine in enumerate(tracked.engines):
                engine.save_state(os.path.join(tmp, f"engine-{i}"))
            torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
            if self.main:
                torch.save({"step": step, "engines": len(tracked.engines), "guard": guard.state_dict(),
                            "state": {k: v.state_dict() for k, v in state.items()}}, os.path.join(tmp, "trainer.pt"))

        path = self.store.save(stage, step, write, engines=len(tracked.engines), world_size=self.c.backend.world_size)
        if self.main:
            self.hook.rlhfkit_checkpoint_saved(stage=stage, path=path)
        return path

    def load_training(self, path: str, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
        """Restore a training checkpoint in place; return its step."""
        try:
            trainer = load_tensors(os.path.join(path, "trainer.pt"), map_location="cpu")
            if trainer["engines"] != len(tracked.engines):
                raise CheckpointError(
                    f"{path} holds {trainer['engines']} trained model(s), but this run trains {len(tracked.engines)} "
                    "(a different algorithm?). Resume with the run's own settings, or start a new run.")
            for i, engine in enumerate(tracked.engines):
                engine.load_state(os.path.join(path, f"engine-{i}"))
            for name, obj in state.items():
                obj.load_state_dict(trainer["state"][name])
            guard.load_state_dict(trainer["guard"])
            rng = os.path.join(path, f"rng-{self.c.backend.rank}.pt")
            set_rng_state(load_tensors(rng if os.path.exists(rng) else os.path.join(path, "rng-0.pt")))
        except CheckpointError:
            raise
        except Exception as exc:  # a checkpoint that verifies but does not fit this run
            raise CheckpointError(f"{path} cannot be loaded into this run: {type(exc).__name__}: {exc}") from exc
        return int(trainer["step"])

    def resume_stage(self, stage: str, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
        """Load the newest good checkpoint of ``stage`` (0 if there is none)."""
        for path in self.store.valid(stage, self.warn):
            try:
                step = self.load_training(path, tracked, state, guard)
            except CheckpointError as exc:
                self.warn(f"{exc} Trying an older checkpoint.")
                continue
            self.say(f"[{stage}] resuming at step {step} from {path}")
            return step
        self.say(f"[{stage}] no checkpoint to resume from: starting the stage")
        return 0

    def rollback(self, stage: str, step: int, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
        """The guard tripped at ``step``: reload the last good checkpoint with the learning
        rate times ``guard.lr_factor``, or stop with a report."""
        gc = self.guard_cfg
        path = self.store.latest(stage, self.warn) if self.ckpt_cfg.every else None
        why = None
        if gc.on_divergence == OnDivergence.stop:
            why = "guard.on_divergence=stop"
        elif path is None:
            why = "there is no checkpoint of this stage to roll back to (set checkpoint.every to a smaller number of steps)"
        elif guard.rollbacks >= gc.max_rollbacks:
            why = f"the stage already rolled back guard.max_rollbacks={gc.max_rollbacks} times"
        if why is not None:
            report = {"stage": stage, "step": step, "consecutive_bad_steps": guard.consecutive, "bad_steps": guard.history,
                      "rollbacks": guard.rollbacks, "lr_scale": guard.lr_scale, "last_good_checkpoint": path, "stopped_because": why}
            if self.main:
                atomic_write_text(os.path.join(self.run_dir, "divergence.json"), json.dumps(report, indent=2))
            last = guard.history[-1]["reasons"] if guard.history else []
            raise DivergenceError(
                f"{stage} diverged: {guard.consecutive} bad steps in a row up to step {step} ({'; '.join(last)}); stopped because "
                f"{why}. Report: {os.path.join(self.run_dir, 'divergence.json')}. Lower the learning rate, or resume from "
                f"{path or 'the start of the stage'} with rlhfkit resume={self.run_dir} and different settings.")
        current = guard.state_dict()
        back = self.load_training(path, tracked, state, guard)
        target = current["lr_scale"] * gc.lr_factor
        for engine in tracked.engines:
            engine.scale_lr(target / guard.lr_scale)
        guard.lr_scale, guard.rollbacks, guard.skipped_total = target, current["rollbacks"] + 1, current["skipped_total"]
        self.warn(f"[{stage}] diverged at step {step}: rolled back to step {back} ({path}) with the learning rate "
                  f"x{target:g} (rollback {guard.rollbacks} of at most {gc.max_rollbacks}).")
        self.log(stage, back, guard.metrics())
        return back

    @staticmethod
    def check_product(stage: str, path: str) -> None:
        """A stage product read from elsewhere (``from_run``, a reward model's path) must
        match its manifest; one without a manifest (a Hugging Face directory of the user's
        own) is taken as it is."""
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            return
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path} is corrupt or incomplete: {problem}. Train the '{stage}' stage again "
                                  f"(add it to stages), or take it from a run where it is intact.")

    def stage_done(self, stage: str) -> bool:
        """Resuming: ``stage``'s product is on disk and intact."""
        path = os.path.join(self.run_dir, stage)
        if not os.path.isdir(path):
            return False
        problem = verify(path)
        if problem:
            self.warn(f"{path} is incomplete or corrupt ({problem}); running the {stage} stage again from its last checkpoint.")
        return problem is None

    # -- data checks ----------------------------------------------------------------------

    def bind_data(self, policy: Policy) -> None:
        """Let the dataset render with the policy's tokenizer; note the model's context."""
        bind = getattr(self.c.dataset, "bind_tokenizer", None)
        if bind is not None:
            bind(policy.tokenizer)
        self.context = context_length(policy.model)

    def scorer(self, rm: Any, policy_tokenizer: Any) -> Any:
        """``rm`` as the policy's token ids reach it: itself, or re-tokenized when it has a
        tokenizer of its own with another vocabulary."""
        rm_tok = getattr(rm, "tokenizer", None)
        if same_vocabulary(rm_tok, policy_tokenizer):
            return rm
        return Retokenized(rm, rm_tok, policy_tokenizer, _rm_context(rm))

    def where(self, prompt: str, source: str = "") -> str:
        return source or getattr(self.c.dataset, "sources", {}).get(prompt) or f"prompt {describe(prompt)}"

    def prompt_fits(self, tok: Any, prompt: str, room: int, source: str = "", n: int | None = None) -> bool:
        """Whether ``prompt`` (``n`` tokens, if already counted) leaves ``room`` tokens in
        the policy's context. One that does not is a bad record: an error, or counted."""
        if not self.context:
            return True
        n = len(tok(prompt, add_special_tokens=False)["input_ids"]) if n is None else n
        if n + room <= self.context:
            return True
        detail = (f"{n} tokens; the model takes {self.context}" if room == 1
                  else f"{n} tokens + {room} to generate > the model's {self.context}")
        self.issues.bad(self.where(prompt, source), "prompt longer than the context", detail)
        return False

    def fit_prompts(self, prompts: Sequence[str], tok: Any, room: int) -> list[str]:
        """Prompts with ``room`` tokens left in the context (bad ones raise or are counted)."""
        return [p for p in prompts if self.prompt_fits(tok, p, room)]

    def report_data(self) -> None:
        """Log and print the bad-record counts (bad_data=skip) that are new since last time."""
        counts = dict(getattr(self.c.dataset, "skipped", {}) or {})
        for k, v in self.issues.skipped.items():
            counts[k] = counts.get(k, 0) + v
        if counts != self._reported:
            self._reported = counts
            self.log("data", 0, {f"data/skipped/{k}": v for k, v in counts.items()} | {"data/skipped": sum(counts.values())})
            details = "; ".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            self.warn(f"bad_data=skip: skipped {sum(counts.values())} bad record(s): {details}")

    # -- stages ---------------------------------------------------------------------------

    def run_sft(self) -> Policy:
        cfg, backend = self.sft_cfg, self.c.backend
        seed_everything(self.cfg.seed)
        policy = self.c.policy.build(self.c.dataset)
        self.bind_data(policy)
        examples = self.c.dataset.sft_examples("train")
        tok = policy.tokenizer
        rows = []
        for e in examples:  # a prompt must leave room for a response; the response is cut to the context
            ids, plen = tokenize_pair(tok, e.prompt, e.response)
            if self.prompt_fits(tok, e.prompt, 1, e.source, n=plen):
                rows.append((ids[: self.context] if self.context else ids, plen))
        self.report_data()
        if not rows:
            raise ConfigError("The dataset has no usable SFT demonstrations (train split).")
        model = policy.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(model, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(rows), cfg.batch_size, self.cfg.seed)
        t0, tokens = time.time(), 0

        def sft_step(step: int) -> dict[str, float]:
            nonlocal tokens
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
            return {"loss/sft": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "perf/tokens_per_s": tokens / max(time.time() - t0, 1e-9) * backend.world_size}

        self.train_loop("sft", cfg.steps, cfg.log_every, sft_step, tracked, {"batches": batches})
        model.eval()
        self.save("sft", policy)
        return policy

    def run_rm(self) -> RewardModel:
        cfg, backend = self.rm_cfg, self.c.backend
        seed_everything(self.cfg.seed + 1)
        # Each stage starts from the previous stage's checkpoint on disk: that is what a
        # stage run alone does, and the in-memory model may be sharded for training.
        sft_policy = self.c.policy.load(self.paths["sft"])
        sft_policy.model = backend.prepare_frozen(sft_policy.model)
        self.bind_data(sft_policy)
        sampler = self.sampler(sft_policy, self.rl_cfg.rollout)
        train = self.fit_comparisons(self.c.dataset.comparisons("train", sampler), sft_policy.tokenizer)
        test = self.fit_comparisons(self.c.dataset.comparisons("test", sampler), sft_policy.tokenizer)
        self.report_data()
        if not train:
            raise ConfigError("The dataset has no usable comparisons for the reward model (train split).")
        base = getattr(self.c.reward_model, "base_model", None) or self.paths["sft"]
        rm = self.c.reward_model.build(base, self.c.reward_head)
        tok = getattr(rm, "tokenizer", None) or sft_policy.tokenizer  # the RM reads text with its own tokenizer
        self.rm_context = _rm_context(rm) or self.context
        optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        units = train if cfg.loss == RMLoss.kwise else _as_pairs(train)
        steps = cfg.epochs * math.ceil(len(units) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, steps, cfg.min_lr_ratio))
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(rm, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(units), cfg.batch_size, self.cfg.seed + 1)

        def rm_step(step: int) -> dict[str, float]:
            batch = backend.shard([units[i] for i in next(batches)])
            with backend.autocast():
                loss, acc = self._rm_loss(engine, tok, batch)
            engine.backward(loss)
            grad_norm = engine.step()
            return {"loss/rm": loss.item(), "rm/train_accuracy": acc.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}

        self.train_loop("rm", steps, cfg.log_every, rm_step, tracked, {"batches": batches})
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

    def fit_comparisons(self, comparisons: Sequence[Comparison], tok: Any) -> list[Comparison]:
        """Comparisons whose prompt leaves room for a response in the context."""
        return [c for c in comparisons if self.prompt_fits(tok, c.prompt, 1, c.source)]

    def _rm_loss(self, model, tok, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss over this rank's share of the batch, normalised so that the average
        over ranks is the loss over the whole batch."""
        backend = self.c.backend
        if self.rm_cfg.loss == RMLoss.kwise:
            prompts = [c.prompt for c in batch for _ in c.responses]
            responses = [r for c in batch for r in c.responses]
            e = encode_pairs(tok, prompts, responses, self.device, max_length=self.rm_context)
            rewards = model(e.input_ids, e.attention_mask)  # (sum K,) each completion once
            win, lose, group = comparison_pairs([c.scores for c in batch])
            n_with_pairs = float(len(set(group.tolist())))
            denom = dp_denominator(n_with_pairs, backend.all_reduce_sum, backend.world_size)
            return kwise_loss(rewards, win, lose, group, len(batch), denom=denom)
        prompts = [p for p, _, _ in batch] * 2
        e = encode_pairs(tok, prompts, [c for _, c, _ in batch] + [r for _, _, r in batch], self.device, max_length=self.rm_context)
        rewards = model(e.input_ids, e.attention_mask)
        denom = dp_denominator(float(len(batch)), backend.all_reduce_sum, backend.world_size)
        return pairwise_loss(rewards[: len(batch)], rewards[len(batch) :], denom=denom)

    @torch.no_grad()
    def _scores(self, rm: RewardModel, tok, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        bs = self.eval_cfg.batch_size
        for i in range(0, len(prompts), bs):
            e = encode_pairs(tok, prompts[i : i + bs], responses[i : i + bs], self.device, max_length=self.rm_context)
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
        loader = self.c.policy
        policy = loader.load(self.paths["sft"])
        if hasattr(loader, "adapt"):  # LoRA: a fresh adapter on the SFT weights
            policy = loader.adapt(policy)
        # under LoRA the reference is the policy with its adapter disabled: no second copy
        reference = loader.shared_reference(policy) if hasattr(loader, "shared_reference") else None
        if reference is None:
            reference = loader.load(self.paths["sft"])
            reference.model = backend.prepare_frozen(reference.model)
        # from disk, not the RM stage's object: under ZeRO-3 that one is sharded for training
        rm_module = self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
        self.bind_data(policy)
        tok = policy.tokenizer
        rm = self.scorer(backend.prepare_frozen(rm_module), tok)
        critic_shares_rm = not isinstance(rm, Retokenized)  # the RM reads the policy's tokens
        # PPO-ptx demonstrations: those that fit the context whole
        demos = [d for d in self.c.dataset.sft_examples("train")
                 if not self.context or len(tokenize_pair(tok, d.prompt, d.response)[0]) <= self.context]

        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy.model)

        def make_critic() -> RewardModel:
            if critic_shares_rm:  # InstructGPT: the value model starts as the reward model
                critic = self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
                critic.requires_grad_(True)
                if hasattr(self.c.reward_model, "adapt"):
                    critic = self.c.reward_model.adapt(critic)
            else:  # the RM reads another vocabulary: a fresh value head on the SFT model
                critic = self.c.reward_model.build(self.paths["sft"], self.c.reward_head)
            if cfg.gradient_checkpointing:
                enable_gradient_checkpointing(getattr(critic, "backbone", critic))
            return critic

        sft_batches = Batches(len(demos), 32, self.cfg.seed + 7, transform=lambda idx: [demos[i] for i in idx]) if demos else None
        tracked = TrackingBackend(backend)  # the engines the algorithm prepares are checkpointed and guarded
        ctx = RLContext(
            policy=policy, reference=reference, reward_model=rm, backend=tracked, rollout=cfg.rollout,
            total_steps=cfg.steps, make_critic=make_critic, sft_batches=sft_batches,
            generate=self.c.generator, scoring=cfg.scoring,
        )
        algorithm: PreferenceOptimizer = self.registry.build("algorithm", self.c.algorithm_node)
        algorithm.setup(ctx)
        prompts = self.fit_prompts(self.c.dataset.prompts("train"), tok, cfg.rollout.max_new_tokens)
        self.report_data()
        if not prompts:
            raise ConfigError("The dataset has no usable RL prompts (train split).")
        if len(prompts) < cfg.prompts_per_step:  # every batch holds exactly prompts_per_step (checked against the ranks)
            self.warn(f"rl.prompts_per_step={cfg.prompts_per_step}, but the dataset has {len(prompts)} usable RL "
                      "prompts: each RL batch repeats some of them.")
            prompts = prompts * math.ceil(cfg.prompts_per_step / len(prompts))
        batches = Batches(len(prompts), cfg.prompts_per_step, self.cfg.seed + 2)
        eval_prompts = self.eval_prompts(tok)

        def rl_step(step: int) -> dict[str, float]:
            t0 = time.time()
            metrics = self.mean_over_ranks(algorithm.step([prompts[i] for i in next(batches)]))
            metrics["perf/step_s"] = time.time() - t0
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                result = self.evaluate(policy, reference, rm, eval_prompts)
                self.log("rl", step, {f"eval/{k}": v for k, v in result.metrics.items()})
            return metrics

        state = {"batches": batches, "algorithm": algorithm} | ({"sft_batches": sft_batches} if sft_batches else {})
        self.train_loop("rl", cfg.steps, cfg.log_every, rl_step, tracked, state)
        policy.model.eval()
        self.save("rl", policy)
        return policy, algorithm

    # -- evaluation -----------------------------------------------------------------------

    def eval_prompts(self, tok: Any) -> list[str]:
        prompts = self.fit_prompts(self.c.dataset.prompts("test"), tok, self.rl_cfg.rollout.max_new_tokens)
        self.report_data()
        return prompts[: self.eval_cfg.num_prompts]

    @torch.no_grad()
    def evaluate(self, policy: Policy, reference: Policy, rm: RewardModel | None, prompts: Sequence[str],
                 name: str = "rl") -> "EvalResult":
        """Mean gold reward, proxy (RM) reward, KL to SFT and EOS rate of ``policy``'s samples.

        Each ``name`` (sft, rl) samples from its own fixed stream: reproducible, and
        independent of the other policy's. Were the streams shared, inverse-CDF sampling
        would couple SFT's and RL's responses (the same uniforms pick the same tokens where
        the policies agree), and the win rate would not compare independent draws as
        InstructGPT's does."""
        rollout_cfg = self.rl_cfg.rollout
        was_training = policy.model.training
        policy.model.eval()
        gen = torch.random.get_rng_state()
        torch.manual_seed(self.cfg.seed + 12345 + EVAL_STREAMS[name])
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
        if self.main:  # what killed writers of stage products and files left
            remove_temporaries(self.run_dir)
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
        t0 = time.time()
        timings: dict[str, float] = {}
        runners = {"sft": self.run_sft, "rm": self.run_rm, "rl": self.run_rl}
        with self.preemption:
            for stage in [s for s in STAGES if s in self.cfg.stages]:
                if self.resuming and self.stage_done(stage):
                    self.say(f"[{stage}] already complete in {self.paths[stage]}: skipping it")
                    continue
                if self.c.backend.any_rank(self.preemption.requested):
                    raise self.preemption.stopped(f"stopped before the {stage} stage. Continue with: rlhfkit resume={self.run_dir}")
                t = time.time()
                runners[stage]()
                timings[stage] = time.time() - t
            t = time.time()
            table = self.final_evaluation()
        timings["eval"] = time.time() - t
        table["seconds"] = {**timings, "total": time.time() - t0}
        if self.main:
            atomic_write_text(os.path.join(self.run_dir, "eval.json"), json.dumps(table, indent=2))
            print(format_table(table), flush=True)
        return table

    def final_evaluation(self) -> dict[str, Any]:
        """Evaluate the SFT policy and (if trained here) the RL policy on the same held-out
        prompts, both loaded from their checkpoints: a resumed run scores exactly what an
        uninterrupted one does."""
        rl_policy = None
        if "rl" in self.cfg.stages:
            rl_policy = self.c.policy.load(self.paths["rl"])
            rl_policy.model = self.c.backend.prepare_frozen(rl_policy.model)
        # fresh from the checkpoints: the stages' own objects may be sharded for training
        sft = self.c.policy.load(self.paths["sft"])
        sft.model = self.c.backend.prepare_frozen(sft.model)
        self.bind_data(sft)
        rm = None
        if os.path.isdir(self.paths["rm"]) or getattr(self.c.reward_model, "pretrained_path", None):
            rm = self.c.reward_model.load(self.paths["rm"], self.c.reward_head)
            rm = self.scorer(self.c.backend.prepare_frozen(rm), sft.tokenizer)
        prompts = self.eval_prompts(sft.tokenizer)
        if not prompts:
            raise ConfigError("The dataset has no usable held-out prompts to evaluate on (test split).")
        table: dict[str, Any] = {"num_prompts": len(prompts), "policies": {}}
        if self._reported:
            table["data_skipped"] = dict(self._reported)
        base = self.evaluate(sft, sft, rm, prompts, name="sft")
        table["policies"]["sft"] = base.metrics
        self.log("eval", 0, {f"sft/{k}": v for k, v in base.metrics.items()})
        if self.main:
            self.hook.rlhfkit_log_samples(stage="sft", step=0, rows=base.rows(self.eval_cfg.num_samples_logged))
        if rl_policy is not None:
            res = self.evaluate(rl_policy, sft, rm, prompts, name="rl")
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


EVAL_STREAMS = {"sft": 0, "rl": 1}
"""Offsets of each evaluated policy's sampling seed (see :meth:`Run.evaluate`)."""


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


def _rm_context(rm: Any) -> int | None:
    inner = getattr(rm, "module", rm)
    return context_length(getattr(inner, "backbone", None) or getattr(inner, "model", None) or inner)


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


def _as_pairs(comparisons: Sequence[Comparison]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for every strictly ordered pair."""
    out = []
    for c in comparisons:
        for i, j in itertools.combinations(range(len(c.responses)), 2):
            if c.scores[i] != c.scores[j]:
                a, b = (i, j) if c.scores[i] > c.scores[j] else (j, i)
                out.append((c.prompt, c.responses[a], c.responses[b]))
    return out
