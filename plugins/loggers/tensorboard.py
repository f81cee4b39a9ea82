"""``logger=tensorboard``: scalars (``<stage>/<metric>`` against each stage's step) and
sample completions (as text) in TensorBoard event files under ``<run_dir>/tensorboard``.
Needs the ``tensorboard`` package (``pip install 'rlhfkit[tensorboard]'``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError


@dataclass
class TensorBoardConfig:
    subdir: str = "tensorboard"
    """Event files go to <run_dir>/<subdir>."""


class TensorBoardLogger:
    def __init__(self, cfg: TensorBoardConfig):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'rlhfkit[tensorboard]'.") from exc
        self.cfg, self.SummaryWriter, self.writer = cfg, SummaryWriter, None

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self.writer = self.SummaryWriter(os.path.join(run_dir, self.cfg.subdir))

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(f"{stage}/{k}", v, step)

    @hookimpl
    def rlhfkit_log_samples(self, stage, step, rows):
        text = "\n\n".join(" | ".join(f"**{k}**: {v}" for k, v in r.items()) for r in rows)
        self.writer.add_text(f"{stage}/samples", text, step)

    @hookimpl
    def rlhfkit_run_end(self, run_dir, summary):
        if self.writer is not None:
            self.writer.close()


@hookimpl
def rlhfkit_register_loggers(register):
    register("tensorboard", TensorBoardLogger, TensorBoardConfig)
