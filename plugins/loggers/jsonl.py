"""``logger=jsonl``: every metric as one JSON line in ``<run_dir>/metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

from rlhfkit import hookimpl


@dataclass
class JsonlConfig:
    filename: str = "metrics.jsonl"
    """File name inside the run directory."""
    samples_filename: str = "samples.jsonl"
    """Where sample completions go."""


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class JsonlLogger:
    def __init__(self, cfg: JsonlConfig):
        self.cfg = cfg
        self._metrics = self._samples = None

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self._metrics = open(os.path.join(run_dir, self.cfg.filename), "a", buffering=1)
        self._samples = open(os.path.join(run_dir, self.cfg.samples_filename), "a", buffering=1)

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        row = {"stage": stage, "step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")

    @hookimpl
    def rlhfkit_log_samples(self, stage, step, rows):
        for r in rows:
            self._samples.write(json.dumps({"stage": stage, "step": step, **r}) + "\n")

    @hookimpl
    def rlhfkit_run_end(self, run_dir, summary):
        for f in (self._metrics, self._samples):
            if f is not None:
                f.close()


@hookimpl
def rlhfkit_register_loggers(register):
    register("jsonl", JsonlLogger, JsonlConfig)
