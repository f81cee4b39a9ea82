"""``logger=console``: a live progress bar with ETA and each stage's key metrics on a
terminal; one plain line per logged step when the output is not a TTY (CI logs, files)."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

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
    progress_bar: Optional[bool] = None
    """Live progress bar: null = only when the output is a terminal."""


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(stage: str, step: int, total: int, elapsed: float, metrics: str, width: int = 100) -> str:
    """``[rl] ######....  12/60  20% 0:05<0:21 | loss/policy=0.1 ...``, cut to ``width``."""
    frac = step / total if total else 1.0
    bar_w = 20
    filled = int(round(frac * bar_w))
    eta = elapsed / step * (total - step) if step else 0.0
    line = f"[{stage}] {'#' * filled}{'.' * (bar_w - filled)} {step:>{len(str(total))}}/{total} {frac:4.0%} " \
           f"{format_eta(elapsed)}<{format_eta(eta)}"
    if metrics:
        line += " | " + metrics
    return line[:width]


class ConsoleLogger:
    def __init__(self, cfg: ConsoleConfig, stream=None):
        self.cfg = cfg
        self.stream = stream or sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tty if cfg.progress_bar is None else cfg.progress_bar
        self._t0 = time.time()
        self._stage_t0: dict[str, float] = {}
        self._last: dict[str, str] = {}  # stage -> last metrics text
        self._open = False  # a progress line is on screen without its newline

    def _shown(self, metrics) -> str:
        return " ".join(f"{k}={metrics[k]:.4g}" for k in self.cfg.keys if k in metrics)

    def _print(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        print(text, file=self.stream, flush=True)

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self._t0 = time.time()
        self._print(f"[rlhfkit] run directory: {run_dir}")

    @hookimpl
    def rlhfkit_progress(self, stage, step, total):
        if not self.bar:
            return
        now = time.time()
        t0 = self._stage_t0.setdefault(stage, now)
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[2K" + progress_line(stage, step, total, now - t0, self._last.get(stage, ""), width))
        self.stream.flush()
        self._open = step < total
        if step >= total:
            self.stream.write("\n")
            self.stream.flush()

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        shown = self._shown(metrics)
        if not shown:
            return
        self._last[stage] = shown
        if not self.bar:  # the bar shows the latest metrics; plain output gets a line each
            self._print(f"[{stage} {step:>4d} {time.time() - self._t0:6.1f}s] {shown}")

    @hookimpl
    def rlhfkit_checkpoint_saved(self, stage, path):
        self._print(f"[{stage}] checkpoint saved: {path}")


@hookimpl
def rlhfkit_register_loggers(register):
    register("console", ConsoleLogger, ConsoleConfig)
