"""The one training loop every stage uses: steps, logging, progress, checkpoints, resume,
SIGTERM/Ctrl-C and the divergence guard. A stage hands it a step function; the loop owns
everything around the step."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhfkit.checkpoint import CheckpointStore, atomic_write_text, load_tensors, no_space_message, read_manifest
from rlhfkit.config import CheckpointConfig, GuardConfig, OnDivergence
from rlhfkit.errors import CheckpointError
from rlhfkit.interfaces import Backend, StepResult
from rlhfkit.report import environment, environment_changes
from rlhfkit.resume import DivergenceError, Guard, Preemption, TrackingBackend, rng_state, set_rng_state


@dataclass
class Output:
    """Messages, metrics and progress, from rank 0 only."""

    backend: Backend
    hook: Any  # the plugin manager's hook relay

    @property
    def main(self) -> bool:
        return self.backend.is_main

    def say(self, message: str) -> None:
        if self.main:
            print(f"rlhfkit: {message}", flush=True)

    def warn(self, message: str) -> None:
        if self.main:
            print(f"rlhfkit: warning: {message}", file=sys.stderr, flush=True)

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if self.main:
            self.hook.rlhfkit_log_metrics(stage=stage, step=step, metrics={k: float(v) for k, v in metrics.items()})

    def progress(self, stage: str, step: int, total: int) -> None:
        if self.main:
            self.hook.rlhfkit_progress(stage=stage, step=step, total=total)

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.backend.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = self.backend.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, values.tolist()))


StepFn = Callable[[int], StepResult]
"""``step_fn(step)``: one optimizer step (RL: one iteration) of this rank's share."""


class Loop:
    """Runs a stage's steps 1..total. Resumes from the stage's newest good checkpoint,
    checkpoints every ``checkpoint.every`` steps, rolls back or stops when the guard trips,
    and on SIGTERM or a first Ctrl-C checkpoints at the step boundary, then raises
    :class:`rlhfkit.resume.Preempted`."""

    def __init__(self, out: Output, store: CheckpointStore, ckpt: CheckpointConfig, guard: GuardConfig,
                 preemption: Preemption, resuming: bool, run_dir: str):
        self.out, self.store, self.ckpt, self.guard_cfg = out, store, ckpt, guard
        self.preemption, self.resuming, self.run_dir = preemption, resuming, run_dir
        self.backend = out.backend

    def run(self, stage: str, total: int, log_every: int, step_fn: StepFn, tracked: TrackingBackend,
            state: dict[str, Any]) -> None:
        """``state``: what besides the engines ``tracked`` prepared and the RNGs must be
        restored on resume (data positions, the algorithm), each with ``state_dict`` and
        ``load_state_dict``."""
        gc, every, out = self.guard_cfg, self.ckpt.every, self.out
        guard = Guard(gc.max_bad_steps, gc.kl_bound)
        step = self.resume(stage, tracked, state, guard) if self.resuming else 0
        while step < total:
            step += 1
            before = tracked.skipped_steps()
            result = step_fn(step)
            reasons = guard.check(step, tracked.skipped_steps() - before, result.kl)
            out.progress(stage, step, total)
            if step % log_every == 0 or step == total or reasons:
                out.log(stage, step, out.mean_over_ranks(result.metrics) | guard.metrics())
            if reasons:
                out.warn(f"[{stage}] bad step {step} ({guard.consecutive} in a row): {'; '.join(reasons)}")
            if guard.tripped:
                step = self.rollback(stage, step, tracked, state, guard)
                continue
            preempted = self.backend.any_rank(self.preemption.requested)
            if step < total and ((every and step % every == 0 and not guard.consecutive) or preempted):
                self.save(stage, step, tracked, state, guard)
            if preempted and step < total:
                raise self.preemption.stopped(f"stopped {stage} at step {step}/{total} after writing "
                                              f"{self.store.path(stage, step)}. Continue with: rlhfkit resume={self.run_dir}")

    def save(self, stage: str, step: int, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> str:
        rank, main = self.backend.rank, self.out.main

        def write(tmp: str) -> None:
            for i, engine in enumerate(tracked.engines):
                engine.save_state(os.path.join(tmp, f"engine-{i}"))
            torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
            if main:
                torch.save({"step": step, "engines": len(tracked.engines), "guard": guard.state_dict(),
                            "state": {k: v.state_dict() for k, v in state.items()}}, os.path.join(tmp, "trainer.pt"))

        path = self.store.save(stage, step, write, engines=len(tracked.engines), world_size=self.backend.world_size,
                               environment=environment())  # a resume under another one is told so
        if main:
            self.out.hook.rlhfkit_checkpoint_saved(stage=stage, path=path)
        return path

    def load(self, path: str, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
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
            rng = os.path.join(path, f"rng-{self.backend.rank}.pt")
            set_rng_state(load_tensors(rng if os.path.exists(rng) else os.path.join(path, "rng-0.pt")))
        except CheckpointError:
            raise
        except Exception as exc:  # a checkpoint that verifies but does not fit this run
            raise CheckpointError(f"{path} cannot be loaded into this run: {type(exc).__name__}: {exc}") from exc
        return int(trainer["step"])

    def resume(self, stage: str, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
        """Load the newest good checkpoint of ``stage`` (0 if there is none)."""
        for path in self.store.valid(stage, self.out.warn):
            try:
                step = self.load(path, tracked, state, guard)
            except CheckpointError as exc:
                self.out.warn(f"{exc} Trying an older checkpoint.")
                continue
            self.out.say(f"[{stage}] resuming at step {step} from {path}")
            changes = environment_changes(read_manifest(path).get("environment"), environment())
            if changes:
                self.out.warn(f"{path} was written under other versions or thread counts ({changes}): the resumed "
                              "run continues, but will not repeat the uninterrupted one exactly. Resume under the "
                              "checkpoint's to repeat it.")
            return step
        self.out.say(f"[{stage}] no checkpoint to resume from: starting the stage")
        return 0

    def rollback(self, stage: str, step: int, tracked: TrackingBackend, state: dict[str, Any], guard: Guard) -> int:
        """The guard tripped at ``step``: reload the last good checkpoint with the learning
        rate times ``guard.lr_factor``, or stop with a report."""
        gc = self.guard_cfg
        path = self.store.latest(stage, self.out.warn) if self.ckpt.every else None
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
            if self.out.main:
                atomic_write_text(os.path.join(self.run_dir, "divergence.json"), json.dumps(report, indent=2))
            last = guard.history[-1]["reasons"] if guard.history else []
            raise DivergenceError(
                f"{stage} diverged: {guard.consecutive} bad steps in a row up to step {step} ({'; '.join(last)}); stopped because "
                f"{why}. Report: {os.path.join(self.run_dir, 'divergence.json')}. Lower the learning rate, or resume from "
                f"{path or 'the start of the stage'} with rlhfkit resume={self.run_dir} and different settings.")
        current = guard.state_dict()
        back = self.load(path, tracked, state, guard)
        target = current["lr_scale"] * gc.lr_factor
        for engine in tracked.engines:
            engine.scale_lr(target / guard.lr_scale)
        guard.lr_scale, guard.rollbacks, guard.skipped_total = target, current["rollbacks"] + 1, current["skipped_total"]
        self.out.warn(f"[{stage}] diverged at step {step}: rolled back to step {back} ({path}) with the learning rate "
                      f"x{target:g} (rollback {guard.rollbacks} of at most {gc.max_rollbacks}).")
        self.out.log(stage, back, guard.metrics())
        return back

    def no_space(self, stage: str) -> CheckpointError:
        """The error for a full disk while writing ``stage``'s product."""
        return CheckpointError(no_space_message(self.run_dir, self.store.latest(stage, lambda _: None), self.run_dir))
