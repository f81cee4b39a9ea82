"""Orchestration: build the components, resolve ``from_run``/``resume``, check that the stage
list can run, run each stage (a plugin, see :class:`rlhfkit.interfaces.Stage`) with the
lifecycle hooks, then evaluate every policy the run trained against the SFT policy.

The pipeline knows no algorithm and no stage: what a stage needs and makes, it declares."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhfkit.checkpoint import CheckpointStore, atomic_write_text, remove_temporaries, verify
from rlhfkit.config import validate_run
from rlhfkit.context import DataView, StageContext
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import Dataset, RewardModelLoader, RewardSource, Stage, optional
from rlhfkit.loop import Loop, Output
from rlhfkit.plugin_manager import Plugins
from rlhfkit.registry import MULTI_GROUPS, NAME_KEY, STAGE_GROUP, Registry
from rlhfkit.report import environment
from rlhfkit.resume import Preemption
from rlhfkit.rlhf.evaluation import format_table, versus
from rlhfkit.secrets import redact

BASE = "sft"
"""The product every run evaluates against: the policy the others start from."""


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


class Components:
    """Each component group's plugin, built on first use from its own config slice
    (``logger``: the list of chosen loggers)."""

    def __init__(self, cfg: DictConfig, registry: Registry):
        self.cfg, self.registry, self._built = cfg, registry, {}

    def __getitem__(self, group: str) -> Any:
        if group not in self._built:
            node = self.cfg.get(group)
            if group in MULTI_GROUPS:
                self._built[group] = [self.registry.build(group, n) for n in (node or {}).values()]
            else:
                self._built[group] = self.registry.build(group, node)
        return self._built[group]

    def named(self, group: str, name: str) -> Any:
        """The group's plugin ``name``: the run's own choice, with its settings, when the run
        chose that one; else one built once with ``name``'s defaults (an ensemble member's
        head of another kind: ``rm.member_heads``)."""
        node = self.cfg.get(group)
        if node is not None and node.get(NAME_KEY) == name:
            return self[group]
        key = f"{group}/{name}"
        if key not in self._built:
            self._built[key] = self.registry.build(group, OmegaConf.create({NAME_KEY: name}))
        return self._built[key]

    def fresh(self, group: str) -> Any:
        """A new instance (a fresh algorithm per stage: its own optimizer)."""
        return self.registry.build(group, self.cfg.get(group))


class Run:
    """One pipeline run in ``run_dir``: ``Run(cfg, registry, plugins, run_dir)()``."""

    def __init__(self, cfg: DictConfig, registry: Registry, plugins: Plugins, run_dir: str):
        self.cfg, self.registry, self.plugins = cfg, registry, plugins
        self.settings = validate_run(cfg, registry).settings  # the CLI did this before Hydra made the run directory
        resume = cfg.get("resume", False)
        if isinstance(resume, str) and resume.lower() not in ("true", "false", ""):
            run_dir = resume  # resume=<run dir>: continue that run there
        self.resuming = bool(resume) and str(resume).lower() != "false"
        if self.resuming and not os.path.isfile(os.path.join(run_dir, "config.yaml")):
            raise CheckpointError(f"resume: {run_dir!r} is not an rlhfkit run directory (no config.yaml). "
                                  "Pass resume=<the run directory to continue>.")
        self.c = Components(cfg, registry)
        backend = self.backend = self.c["backend"]
        for group in registry.groups():
            if group not in (STAGE_GROUP, "algorithm"):  # an algorithm is built fresh by the stage that runs it
                self.c[group]  # fail on a bad plugin setting now, not stages later
        if backend.world_size > 1:  # ranks may disagree on ${now:...}: rank 0's directory wins
            run_dir = backend.gather_objects([run_dir])[0]
        self.run_dir, self.main = run_dir, backend.is_main  # rank 0 writes and fires the lifecycle hooks
        share = (lambda x: backend.gather_objects([x])[0]) if backend.world_size > 1 else (lambda x: x)
        self.store = CheckpointStore(run_dir, self.settings.checkpoint.keep_last, self.main, share=share, barrier=backend.barrier)
        self.preemption = Preemption()
        self.out = Output(backend, plugins.pm.hook)
        self.loop = Loop(self.out, self.store, self.settings.checkpoint, self.settings.guard, self.preemption,
                         self.resuming, run_dir)
        self.data = DataView(self.c["data"], self.settings.bad_data, self.out)
        self.stages: list[tuple[str, Stage]] = [
            (name, registry.get(STAGE_GROUP, name).factory(getattr(self.settings, name))) for name in self.settings.stages]
        self.made = {name for name, _ in self.stages}
        """The products this run makes (by stage name)."""
        self.products: dict[str, str] = {}
        self.plan()

    def plan(self) -> None:
        """Check, before any work, that every stage gets what it needs: each product from
        an earlier stage, ``from_run`` or a pretrained reward model, and its data parts
        from the dataset."""
        provides, reward_needs = optional(self.c["data"], Dataset, "provides"), tuple(self.c["reward"].needs)
        optional(self.c["reward"], RewardSource, "check_data")(self.c["data"])
        for i, (name, stage) in enumerate(self.stages):
            missing = [d for d in stage.data if d not in provides]
            if missing:
                raise ConfigError(f"stages: '{name}' reads {' and '.join(missing)}, which data={self.cfg.data.get('_name_')} "
                                  f"does not have. Give the dataset {' and '.join(missing)}, or drop '{name}' from stages.")
            earlier = {n for n, _ in self.stages[:i]}
            for need in (*stage.needs, *(reward_needs if stage.uses_reward else ())):
                if need in self.made and need not in earlier:
                    raise ConfigError(f"stages={self.settings.stages}: '{name}' needs '{need}', which runs after it. "
                                      f"Put '{need}' before '{name}'.")
                if need not in self.made:
                    self.products[need] = self.external(need)
        if BASE not in self.made:
            self.products[BASE] = self.external(BASE)
        for name, _ in self.stages:
            self.products.setdefault(name, os.path.join(self.run_dir, name))
        for need in reward_needs:  # for the proxy column too, where the product exists
            if need not in self.products:
                path = self.external(need, required=False)
                if path:
                    self.products[need] = path

    def external(self, product: str, required: bool = True) -> str | None:
        """A product no stage here makes: ``from_run``'s, or for ``rm`` a pretrained reward
        model (``reward_model.path``). Checked against its manifest."""
        from_run = self.settings.from_run
        pretrained = optional(self.c["reward_model"], RewardModelLoader, "pretrained_path") if product == "rm" else None
        path = pretrained if pretrained and not from_run else find_checkpoint(str(from_run), product) if from_run else None
        if path is None:
            if not required:
                return None
            raise CheckpointError(
                f"Stage '{product}' is not in stages={list(self.settings.stages)}, so its checkpoint comes from from_run, but "
                + (f"{from_run!r} has no '{product}' checkpoint" if from_run else "from_run is not set")
                + f". Set from_run=<a run directory with a '{product}' checkpoint>, or add '{product}' to stages.")
        self.check_product(product, path)
        return path

    @staticmethod
    def check_product(product: str, path: str) -> None:
        """A product read from elsewhere must match its manifest; one without a manifest (a
        Hugging Face directory of the user's own) is taken as it is."""
        if os.path.isfile(os.path.join(path, "manifest.json")) and (problem := verify(path)):
            raise CheckpointError(f"{path} is corrupt or incomplete: {problem}. Train the '{product}' stage again "
                                  f"(add it to stages), or take it from a run where it is intact.")

    def context(self, name: str) -> StageContext:
        s = self.settings
        return StageContext(name, seed=s.seed, run_dir=self.run_dir, components=self.c, products=self.products,
                            data=self.data, loop=self.loop, out=self.out, rollout=s.rollout, eval=s.eval)

    def __call__(self) -> dict[str, Any]:
        os.makedirs(self.run_dir, exist_ok=True)
        if self.main:  # what killed writers of stage products and files left
            remove_temporaries(self.run_dir)
        loggers = self.c["logger"] if self.main else []  # lifecycle hooks run on rank 0 only
        config = redact(OmegaConf.to_container(self.cfg, resolve=True))  # no credentials on disk or in logs
        if self.main:
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(config)))
        for i, lg in enumerate(loggers):
            self.plugins.register(lg, name=f"rlhfkit-run-logger-{id(self)}-{i}")
        summary: dict[str, Any] = {"status": "failed"}
        hook = self.plugins.pm.hook
        if self.main:
            hook.rlhfkit_run_start(run_dir=self.run_dir, config=config)
        try:
            summary = self.run_stages()
            summary["status"] = "ok"
        except BaseException as exc:
            summary["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self.main:
                hook.rlhfkit_run_end(run_dir=self.run_dir, summary=redact(summary))
            for lg in loggers:
                self.plugins.pm.unregister(lg)
        return summary

    def run_stages(self) -> dict[str, Any]:
        t0, timings = time.time(), {}
        with self.preemption:
            for name, stage in self.stages:
                if self.resuming and self.stage_done(name):
                    self.out.say(f"[{name}] already complete in {self.products[name]}: skipping it")
                    continue
                if self.backend.any_rank(self.preemption.requested):
                    raise self.preemption.stopped(f"stopped before the {name} stage. Continue with: rlhfkit resume={self.run_dir}")
                t = time.time()
                stage.run(self.context(name))
                timings[name] = time.time() - t
            t = time.time()
            table = self.final_evaluation()
        timings["eval"] = time.time() - t
        table["seconds"] = {**timings, "total": time.time() - t0}
        table["environment"] = environment()
        if self.main:
            atomic_write_text(os.path.join(self.run_dir, "eval.json"), json.dumps(table, indent=2))
            print(format_table(table), flush=True)
        return table

    def stage_done(self, name: str) -> bool:
        """Resuming: ``name``'s product is on disk and intact."""
        path = os.path.join(self.run_dir, name)
        if not os.path.isdir(path):
            return False
        problem = verify(path)
        if problem:
            self.out.warn(f"{path} is incomplete or corrupt ({problem}); running the {name} stage again from its last checkpoint.")
        return problem is None

    def final_evaluation(self) -> dict[str, Any]:
        """Evaluate the SFT policy and every policy trained here on the same held-out
        prompts, each loaded from its product: a resumed run scores exactly what an
        uninterrupted one does."""
        ctx = self.context("eval")
        trained = {name: ctx.load_policy(name) for name, s in self.stages if s.produces == "policy" and name != BASE}
        sft = ctx.load_policy(BASE)  # fresh from the products: the stages' own objects may be sharded for training
        self.data.bind(sft)
        reward = self.c["reward"]
        if all(n in self.products and (n not in self.made or os.path.isdir(self.products[n])) for n in reward.needs):
            reward.setup(ctx, sft.tokenizer)
        else:
            reward = None
        prompts = ctx.eval_prompts(sft.tokenizer)
        if not prompts:
            raise ConfigError("The dataset has no usable held-out prompts to evaluate on (test split).")
        table: dict[str, Any] = {"num_prompts": len(prompts), "policies": {}}
        if self.settings.eval.samples_per_prompt > 1:  # the default run's eval.json stays as it was
            table["samples_per_prompt"] = self.settings.eval.samples_per_prompt
        if self.data.reported:
            table["data_skipped"] = dict(self.data.reported)
        n = self.settings.eval.num_samples_logged
        base = ctx.evaluate(sft, sft, reward, prompts, stream=BASE)
        table["policies"][BASE] = base.metrics
        self.out.log("eval", 0, {f"{BASE}/{k}": v for k, v in base.metrics.items()})
        if self.main:
            self.plugins.pm.hook.rlhfkit_log_samples(stage=BASE, step=0, rows=base.rows(n))
        for i, (name, policy) in enumerate(trained.items()):
            res = ctx.evaluate(policy, sft, reward, prompts, stream=name)
            table["policies"][name] = res.metrics
            vs = versus(res, base)
            if i == 0:
                table.update(vs)  # the first trained policy's, at the top level
            if len(trained) > 1:
                table.setdefault("versus_sft", {})[name] = vs
            self.out.log("eval", 0, {f"{name}/{k}": v for k, v in res.metrics.items()} | (vs if i == 0 else {f"{name}/{k}": v for k, v in vs.items()}))
            if self.main:
                self.plugins.pm.hook.rlhfkit_log_samples(stage=name, step=0, rows=res.rows(n))
        return table
