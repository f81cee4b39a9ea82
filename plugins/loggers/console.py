"""``logger=console``: one line per logged step with each stage's key metrics."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from rlhfkit import hookimpl


@dataclass
class ConsoleConfig:
    keys: list[str] = field(
        default_factory=lambda: [
            "loss/sft", "loss/rm", "rm/accuracy", "loss/policy", "loss/value", "reward/proxy", "reward/gold",
            "rollout/kl", "kl_coef", "rollout/eos_rate", "eval/gold", "eval/proxy", "eval/kl", "perf/tokens_per_s",
        ]
    )
    """Metrics shown (when present), in this order."""


class ConsoleLogger:
    def __init__(self, cfg: ConsoleConfig, stream=None):
        self.cfg = cfg
        self.stream = stream or sys.stdout
        self._t0 = time.time()

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self._t0 = time.time()
        print(f"[rlhfkit] run directory: {run_dir}", file=self.stream, flush=True)

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        shown = [f"{k}={metrics[k]:.4g}" for k in self.cfg.keys if k in metrics]
        if not shown:
            return
        print(f"[{stage} {step:>4d} {time.time() - self._t0:6.1f}s] " + " ".join(shown), file=self.stream, flush=True)

    @hookimpl
    def rlhfkit_checkpoint_saved(self, stage, path):
        print(f"[{stage}] checkpoint saved: {path}", file=self.stream, flush=True)


@hookimpl
def rlhfkit_register_loggers(register):
    register("console", ConsoleLogger, ConsoleConfig)
