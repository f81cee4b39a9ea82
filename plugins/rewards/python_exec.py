"""``reward=python_exec``: a verifiable reward for code. Each response is run as a Python
program in a bubblewrap sandbox (:mod:`rlhfkit.plugins.rewards.sandbox`), then its prompt's
tests; the reward is the fraction of them that pass, or ``failure_reward`` when the run
fails (timeout, memory, crash, syntax error, output limit, sandbox error). A prompt's tests
and reference answer come from the dataset (``Dataset.checks``). No stage product needed:
``stages=[sft,rl] reward=python_exec``."""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.context import StageContext
from rlhfkit.errors import DataError
from rlhfkit.interfaces import Check, Dataset, optional
from rlhfkit.plugins.rewards.sandbox import REASONS, Sandbox, SandboxError, SandboxLimits, Verdict, run_python
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.settings import bounded, one_of


@dataclass
class PythonExecConfig(SandboxLimits):
    """The sandbox's isolation and limits (see :class:`SandboxLimits`), and how verdicts become rewards."""

    workers: int = bounded(0, ge=0, le=256)
    """Verifications run in parallel, each worker a thread with a warm sandbox of its own
    (:class:`Sandbox`: started once, then a fresh harness forked per verification); 0: the CPU count."""
    failure_reward: float = 0.0
    """The reward of a response whose run failed (timeout, memory, crash, syntax error,
    output limit, sandbox error); failed tests score the fraction passed instead."""
    missing_check: str = one_of("error", "skip")
    """A rollout prompt the dataset has no check data for: ``error`` stops the run naming it;
    ``skip`` scores it ``failure_reward`` and counts it (``reward/exec_skipped``)."""

    def validate(self, run: RunInfo) -> None:
        self.validate_sandbox()


class PythonExec:
    needs = ()

    def __init__(self, cfg: PythonExecConfig):
        self.cfg = cfg
        self.data: Any = None
        self.checks: Callable[[str], Check | None] = lambda prompt: None
        self.sources: Any = {}
        self.pool: ThreadPoolExecutor | None = None
        self.counts: Counter[str] = Counter()
        self.seconds = 0.0
        self.compiled: set[str] = set()  # prompts whose tests are known to compile
        self.boxes: list[Sandbox] = []  # warm sandboxes, at most one per worker, kept across steps
        self.idle: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self.lock = threading.Lock()
        weakref.finalize(self, _close_all, self.boxes)

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        data = self.data = ctx.components["data"]
        self.checks = optional(data, Dataset, "checks")
        self.sources = optional(data, Dataset, "sources")
        # a sandbox that cannot start at all (no user namespaces, an unreadable interpreter)
        # is a setup problem: say so once, before RL, instead of scoring every row "sandbox_error"
        probe = run_python("7", Check(answer="7", tests=("assert result == 7 and response == '7'",)), self.cfg)
        if probe.reason is not None:
            raise SandboxError(
                f"reward=python_exec: the {self.cfg.isolation} sandbox cannot run a trivial program "
                f"({probe.reason}: {probe.detail}). Check that `{self.cfg.bwrap}` works here (unprivileged user "
                f"namespaces enabled, reward.python readable by any user), or set reward.isolation=none for "
                "trusted code only.")

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        if len(rollout.prompts) != len(rollout.responses):
            raise ValueError("reward=python_exec needs each row's prompt text (Rollout.prompts); the rollout has "
                             f"{len(rollout.prompts)} prompts for {len(rollout.responses)} responses.")
        if self.pool is None:
            # every prompt's check data, train and test, checked at the first step rather than
            # failing at the final evaluation (the prompts are read once the stage bound the tokenizer)
            for split in ("train", "test"):
                for prompt in self.data.prompts(split):
                    self.check(prompt)
            self.pool = ThreadPoolExecutor(self.cfg.workers or os.cpu_count() or 1, thread_name_prefix="python_exec")
        checks = [self.check(p) for p in rollout.prompts]
        jobs = [self.pool.submit(self.verify, r, c) if c else None for r, c in zip(rollout.responses, checks)]
        verdicts: list[Verdict | None] = [j.result() if j else None for j in jobs]
        scores = [v.score(self.cfg.failure_reward) if v else self.cfg.failure_reward for v in verdicts]
        for v in verdicts:
            self.counts["rows"] += 1
            if v is None:
                self.counts["skipped"] += 1
                continue
            self.counts[v.reason or "passed"] += 1
            self.seconds += v.seconds
        return torch.tensor(scores, dtype=torch.float32, device=rollout.input_ids.device)  # (B,)

    def verify(self, code: str, check: Check) -> Verdict:
        """One verification in an idle warm sandbox (a new one if every sandbox is busy)."""
        try:
            box = self.idle.get_nowait()
        except queue.Empty:
            box = Sandbox(self.cfg)
            with self.lock:
                self.boxes.append(box)
        try:
            return box.run(code, check)
        finally:
            self.idle.put(box)

    def close(self) -> None:
        """End the warm sandboxes (also done when the source is garbage-collected, and by each
        sandbox's zygote when this process exits)."""
        _close_all(self.boxes)

    def check(self, prompt: str) -> Check | None:
        """The prompt's check data, or None to skip it (``missing_check=skip``)."""
        check = self.checks(prompt)
        if check is None or (check.answer is None and not check.tests):
            if self.cfg.missing_check == "skip":
                return None
            raise DataError(f"reward=python_exec: no answer or tests for the prompt {prompt[:80]!r}"
                            f"{self._where(prompt)}: give every RL prompt check data (an `answer` or `tests` field), "
                            "or set reward.missing_check=skip to score such prompts reward.failure_reward.")
        if prompt not in self.compiled:  # bad check data is the dataset's fault, not the response's
            for i, test in enumerate(check.tests):
                try:
                    compile(test, f"<test {i}>", "exec")
                except (SyntaxError, ValueError) as e:
                    raise DataError(f"reward=python_exec: test {i} of the prompt {prompt[:80]!r}{self._where(prompt)} "
                                    f"is not valid Python ({e}): fix the check data.") from None
            self.compiled.add(prompt)
        return check

    def _where(self, prompt: str) -> str:
        source = self.sources.get(prompt)
        return f" ({source})" if source else ""

    def metrics(self) -> dict[str, float]:
        """Since the last call: the share of verified rows that passed every check, the count
        of rows failing for each reason, the rows skipped, the mean seconds per verification,
        and the sandboxes started and the seconds spent starting them (their share of a step)."""
        counts, self.counts = self.counts, Counter()
        verified = counts["rows"] - counts["skipped"]
        seconds, self.seconds = self.seconds, 0.0
        starts, start_s = sum(b.starts for b in self.boxes), sum(b.start_seconds for b in self.boxes)
        for b in self.boxes:
            b.starts, b.start_seconds = 0, 0.0
        return {
            "reward/exec_sandbox_starts": float(starts),
            "reward/exec_sandbox_start_s": start_s,
            "reward/exec_pass_rate": counts["passed"] / verified if verified else 0.0,
            **{f"reward/exec_fail_{reason}": float(counts[reason]) for reason in REASONS},
            "reward/exec_skipped": float(counts["skipped"]),
            "reward/exec_s": seconds / verified if verified else 0.0,
        }


def _close_all(boxes: list[Sandbox]) -> None:
    for box in boxes:
        box.close()


@hookimpl
def rlhfkit_register_rewards(register):
    register("python_exec", PythonExec, PythonExecConfig)
