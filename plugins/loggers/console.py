"""``logger=console``: on a terminal, a live rich progress line per stage (step, rate, ETA
and the stage's key metrics) with messages printed above it; one plain line per logged step
when the output is not a TTY (CI logs, files)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

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


class RateColumn(ProgressColumn):
    """Steps per second, or seconds per step when a step takes longer than one."""

    def render(self, task) -> Text:
        speed = task.speed
        if not speed:
            return Text("-- step/s")
        return Text(f"{speed:.2f} step/s" if speed >= 1 else f"{1 / speed:.1f} s/step")


def stage_progress(console: Console, redirect_stderr: bool) -> Progress:
    """``[rl] ━━━━━━━━━━━━━━━━━━━━ 12/60  20% 0:00:05<0:00:21 2.40 step/s loss/policy=0.1 ...``;
    what is printed to stdout (and to stderr when it is the same terminal) while it is live
    appears above it."""
    return Progress(
        TextColumn("[{task.description}]", markup=False), BarColumn(bar_width=20), MofNCompleteColumn(), TaskProgressColumn(),
        TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(), RateColumn(),
        TextColumn("{task.fields[metrics]}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console, redirect_stdout=True, redirect_stderr=redirect_stderr, refresh_per_second=4, expand=True,
    )


class ConsoleLogger:
    def __init__(self, cfg: ConsoleConfig, stream=None):
        self.cfg = cfg
        self.stream = stream or sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tty if cfg.progress_bar is None else cfg.progress_bar
        self.console = Console(file=self.stream, force_terminal=self.bar, highlight=False, soft_wrap=True)
        self._t0 = time.time()
        self._last: dict[str, str] = {}  # stage -> last metrics text
        self._live: Optional[Progress] = None  # the running stage's progress line
        self._task = None
        self._stage: Optional[str] = None
        self._handlers: list[tuple[logging.StreamHandler, object]] = []  # (handler, its own stream) while live

    def _shown(self, metrics) -> str:
        return " ".join(f"{k}={metrics[k]:.4g}" for k in self.cfg.keys if k in metrics)

    def _print(self, text: str) -> None:
        if self._live is not None:
            self.console.print(text, markup=False)  # above the live line
        else:
            print(text, file=self.stream, flush=True)

    def _stop(self) -> None:
        if self._live is not None:
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._live.stop()  # the stage's last line stays on screen
            self._live = self._task = self._stage = None
            self._handlers = []

    def _redirect_logging(self) -> None:
        """Logging handlers keep the stream they were made with (Hydra's, transformers',
        DeepSpeed's: the real stdout or stderr) and would print through the live line:
        while it is live, they write to the redirected streams."""
        redirected = {s.rich_proxied_file: s for s in (sys.stdout, sys.stderr) if hasattr(s, "rich_proxied_file")}
        loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
        for handler in {h for lg in loggers for h in lg.handlers}:
            if type(handler) is logging.StreamHandler and handler.stream in redirected:
                self._handlers.append((handler, handler.setStream(redirected[handler.stream])))

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self._t0 = time.time()
        self._print(f"[rlhfkit] run directory: {run_dir}")

    @hookimpl
    def rlhfkit_progress(self, stage, step, total):
        if not self.bar:
            return
        if self._stage != stage:
            self._stop()
            self._live = stage_progress(self.console, redirect_stderr=getattr(sys.stderr, "isatty", lambda: False)())
            self._task = self._live.add_task(stage, total=total, completed=step - 1, metrics=self._last.get(stage, ""))
            self._stage = stage
            self._live.start()
            self._redirect_logging()
        self._live.update(self._task, completed=step, total=total, metrics=self._last.get(stage, ""), refresh=True)
        if step >= total:
            self._stop()

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
    def rlhfkit_run_end(self, run_dir, summary):
        self._stop()  # a stage that raised leaves no live display (nor redirected stdout) behind


@hookimpl
def rlhfkit_register_loggers(register):
    register("console", ConsoleLogger, ConsoleConfig)
