"""What a stage gets from the run: :class:`StageContext` (components, earlier products, the
data, the training loop, saving and evaluation) and :class:`DataView` (the dataset, checked
against the policy's context)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch

from rlhfkit.checkpoint import atomic_directory, write_manifest
from rlhfkit.config import EvalConfig
from rlhfkit.data import DataIssues, context_length, describe
from rlhfkit.interfaces import Comparison, Dataset, Example, Policy, RewardSource, RolloutConfig, optional
from rlhfkit.loop import Loop, Output, StepFn
from rlhfkit.resume import TrackingBackend
from rlhfkit.rlhf.evaluation import EvalResult, evaluate
from rlhfkit.rlhf.rollout import any_alive_fn
from rlhfkit.rlhf.tokenize import tokenize_pair


class DataView:
    """The dataset's demonstrations, comparisons and prompts, with the checks that need the
    policy's tokenizer: a prompt must leave room in the model's context. A record that
    fails is a bad record: an error naming it, or (``bad_data=skip``) skipped and counted."""

    def __init__(self, dataset: Dataset, bad_data: Any, out: Output):
        self.dataset, self.out = dataset, out
        self.issues = DataIssues(bad_data)
        self.context: int | None = None  # the policy's context length, once bound
        self.reported: dict[str, int] = {}

    def bind(self, policy: Policy) -> None:
        """Let the dataset render with the policy's tokenizer; note the model's context."""
        optional(self.dataset, Dataset, "bind_tokenizer")(policy.tokenizer)
        self.context = context_length(policy.model)

    def where(self, prompt: str, source: str = "") -> str:
        return source or optional(self.dataset, Dataset, "sources").get(prompt) or f"prompt {describe(prompt)}"

    def prompt_fits(self, tok: Any, prompt: str, room: int, source: str = "", n: int | None = None) -> bool:
        """Whether ``prompt`` (``n`` tokens, if already counted) leaves ``room`` tokens in
        the policy's context."""
        if not self.context:
            return True
        n = len(tok(prompt, add_special_tokens=False)["input_ids"]) if n is None else n
        if n + room <= self.context:
            return True
        detail = (f"{n} tokens; the model takes {self.context}" if room == 1
                  else f"{n} tokens + {room} to generate > the model's {self.context}")
        self.issues.bad(self.where(prompt, source), "prompt longer than the context", detail)
        return False

    def prompts(self, split: str, tok: Any, room: int) -> list[str]:
        """Prompts with ``room`` tokens left in the context."""
        out = [p for p in self.dataset.prompts(split) if self.prompt_fits(tok, p, room)]
        self.report()
        return out

    def comparisons(self, split: str, sample: Any, tok: Any) -> list[Comparison]:
        """Comparisons whose prompt leaves room for a response."""
        return [c for c in self.dataset.comparisons(split, sample) if self.prompt_fits(tok, c.prompt, 1, c.source)]

    def demonstrations(self, tok: Any, whole: bool = False) -> list[tuple[Example, list[int], int]]:
        """(demonstration, token ids, prompt tokens) for each usable demonstration: its
        prompt leaves room for a response (the response is then cut to the context), or,
        with ``whole``, all of it fits."""
        rows = []
        for e in self.dataset.sft_examples("train"):
            ids, plen = tokenize_pair(tok, e.prompt, e.response)
            if whole:
                if not self.context or len(ids) <= self.context:
                    rows.append((e, ids, plen))
            elif self.prompt_fits(tok, e.prompt, 1, e.source, n=plen):
                rows.append((e, ids[: self.context] if self.context else ids, plen))
        return rows

    def report(self) -> None:
        """Log and print the bad-record counts (bad_data=skip) that are new since last time."""
        counts = dict(optional(self.dataset, Dataset, "skipped") or {})
        for k, v in self.issues.skipped.items():
            counts[k] = counts.get(k, 0) + v
        if counts != self.reported:
            self.reported = counts
            self.out.log("data", 0, {f"data/skipped/{k}": v for k, v in counts.items()} | {"data/skipped": sum(counts.values())})
            details = "; ".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            self.out.warn(f"bad_data=skip: skipped {sum(counts.values())} bad record(s): {details}")


class StageContext:
    """Handed to :meth:`rlhfkit.interfaces.Stage.run`. ``components[group]`` builds each
    group's plugin from its own config slice (once), ``products[name]`` is the directory of
    an earlier stage's product (this run's or ``from_run``'s)."""

    def __init__(self, name: str, *, seed: int, run_dir: str, components: Any, products: dict[str, str],
                 data: DataView, loop: Loop, out: Output, rollout: RolloutConfig, eval: EvalConfig):
        self.name, self.seed, self.run_dir = name, seed, run_dir
        self.components, self.products, self.data = components, products, data
        self.loop, self.out, self.rollout, self.eval = loop, out, rollout, eval
        self.backend = components["backend"]

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def train(self, total: int, log_every: int, step_fn: StepFn, tracked: TrackingBackend, state: dict[str, Any],
              part: str = "") -> None:
        """Run ``step_fn`` for steps 1..``total`` in the shared loop (:class:`rlhfkit.loop.Loop`).
        A stage that trains several models one after the other (an ensemble's members)
        names each ``part``: it is logged, checkpointed and resumed as ``<stage>/<part>``."""
        self.loop.run(f"{self.name}/{part}" if part else self.name, total, log_every, step_fn, tracked, state)

    def save(self, obj: Any) -> str:
        """Gather the (possibly sharded) weights on every rank and write the stage's
        product, a Hugging Face directory with a manifest, atomically on rank 0."""
        path = self.write(obj, os.path.join(self.run_dir, self.name))
        self.products[self.name] = path
        if self.out.main:
            self.out.hook.rlhfkit_checkpoint_saved(stage=self.name, path=path)
        return path

    def write(self, obj: Any, path: str) -> str:
        """Write ``obj`` (its ``save(dir)``) to ``path`` as :meth:`save` writes a product,
        with a manifest, atomically on rank 0: also for a finished part of a stage that a
        resumed run takes as it is (an ensemble's trained member)."""
        weights = getattr(obj, "model", obj)  # a Policy holds .model; a RewardModel is the module
        # (an object that only copies files already written has no weights to gather)
        with self.backend.gathered(weights) if isinstance(weights, torch.nn.Module) else contextlib.nullcontext():
            if self.out.main:
                with atomic_directory(path, on_no_space=lambda: self.loop.no_space(self.name)) as tmp:
                    obj.save(tmp)
                    write_manifest(tmp, stage=self.name, kind="stage")
        self.backend.barrier()
        return path

    def load_policy(self, product: str = "sft", frozen: bool = True) -> Policy:
        """A policy from a product, inference-only unless ``frozen`` is false."""
        policy = self.components["policy"].load(self.products[product])
        if frozen:
            policy.model = self.backend.prepare_frozen(policy.model)
        return policy

    def sampler(self, policy: Policy):
        """sample(prompts, n) -> n completions per prompt, in eval-sized batches."""
        generator, bs = self.components["generator"], self.eval.batch_size

        def sample_fn(prompts: Sequence[str], n: int) -> list[list[str]]:
            flat = [p for p in prompts for _ in range(n)]
            out: list[str] = []
            for i in range(0, len(flat), bs):
                with self.backend.autocast():
                    out += generator(policy.model, policy.tokenizer, flat[i : i + bs], self.rollout, self.device,
                                     any_alive=any_alive_fn(self.backend)).responses
            return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

        return sample_fn

    def eval_prompts(self, tok: Any) -> list[str]:
        """The held-out prompts every policy is evaluated on."""
        return self.data.prompts("test", tok, self.rollout.max_new_tokens)[: self.eval.num_prompts]

    def evaluate(self, policy: Policy, reference: Policy, reward: RewardSource | None, prompts: Sequence[str],
                 stream: str) -> EvalResult:
        """Gold, proxy, KL to ``reference``, EOS rate and length of ``policy``'s samples,
        drawn from the evaluation stream ``stream`` (see :func:`rlhfkit.rlhf.evaluation.evaluate`)."""
        return evaluate(policy, reference, reward, prompts, generator=self.components["generator"], backend=self.backend,
                        rollout=self.rollout, batch_size=self.eval.batch_size, seed=self.seed, stream=stream,
                        labeller=self.components["data"].labeller, samples_per_prompt=self.eval.samples_per_prompt)
