"""``logger=wandb``: Weights & Biases.

* The resolved Hydra config (credentials redacted, see :mod:`rlhfkit.secrets`) is each
  W&B run's config.
* Metrics keep rlhfkit's stable names, prefixed by stage: ``sft/loss/sft``,
  ``rl/reward/proxy``, ``eval/gold_improvement``. Each stage has its own step axis
  (``<stage>/step``).
* Sample completions are logged as a ``wandb.Table`` (``<stage>/samples``).
* One pipeline is one W&B *group* (``wandb.group``, by default the run directory's name):
  with ``per_stage=true`` (the default) each stage is its own run in that group
  (``job_type`` = stage). Under a W&B sweep agent (``WANDB_SWEEP_ID`` set) the whole
  pipeline logs into the one run the agent started, so the sweep sees its metric.
* ``WANDB_MODE=offline`` (or ``logger.wandb.mode=offline``) needs no account; sync later
  with ``wandb sync``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.secrets import redact


@dataclass
class WandbConfig:
    project: str = "rlhfkit"
    entity: Optional[str] = None
    """Team or user (null: your default entity)."""
    group: Optional[str] = None
    """Groups a pipeline's runs (null: the run directory's name)."""
    name: Optional[str] = None
    """Run name prefix (null: the group)."""
    mode: Optional[str] = None
    """online, offline or disabled (null: WANDB_MODE, else online)."""
    tags: list[str] = field(default_factory=list)
    per_stage: bool = True
    """One W&B run per stage in the pipeline's group (false: one run for the pipeline)."""
    log_samples: bool = True
    dir: Optional[str] = None
    """Where W&B writes its files (null: the run directory)."""


class WandbLogger:
    def __init__(self, cfg: WandbConfig):
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("logger=wandb needs the wandb package: pip install 'rlhfkit[wandb]'.") from exc
        if cfg.mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb.mode={cfg.mode!r}: choose online, offline or disabled.")
        self.wandb, self.cfg = wandb, cfg
        self.run = None
        self.stage: str | None = None
        self.config: dict[str, Any] = {}
        self.group = cfg.group
        self.run_dir = "."
        self.per_stage = cfg.per_stage and not os.environ.get("WANDB_SWEEP_ID")

    def _start(self, stage: str | None) -> None:
        if self.run is not None:
            if not self.per_stage or stage == self.stage:
                return
            self.run.finish()
        self.stage = stage
        name = self.cfg.name or self.group
        os.makedirs(self.cfg.dir or self.run_dir, exist_ok=True)
        self.run = self.wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.group, job_type=stage if self.per_stage else "pipeline",
            name=f"{name}-{stage}" if self.per_stage and stage else name, tags=list(self.cfg.tags), config=self.config,
            mode=self.cfg.mode, dir=self.cfg.dir or self.run_dir, reinit="finish_previous",
        )
        for s in ("sft", "rm", "rl", "eval"):
            self.run.define_metric(f"{s}/step")
            self.run.define_metric(f"{s}/*", step_metric=f"{s}/step")

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self.run_dir = run_dir
        self.config = redact(config)
        self.group = self.cfg.group or os.path.basename(os.path.abspath(run_dir))
        if not self.per_stage:
            self._start(None)

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        self._start(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    @hookimpl
    def rlhfkit_log_samples(self, stage, step, rows):
        if not self.cfg.log_samples or not rows:
            return
        self._start("eval" if self.per_stage else None)
        columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("prompt", "response"), k))
        table = self.wandb.Table(columns=["stage", "step", *columns])
        for r in rows:
            table.add_data(stage, step, *[r.get(c) for c in columns])
        self.run.log({f"{stage}/samples": table})

    @hookimpl
    def rlhfkit_run_end(self, run_dir, summary):
        if self.run is None:
            self._start("eval" if self.per_stage else None)
        for k in ("gold_improvement", "win_rate", "tie_rate"):
            if k in summary:
                self.run.summary[f"eval/{k}"] = summary[k]
        self.run.summary["status"] = summary.get("status")
        self.run.finish(exit_code=0 if summary.get("status") == "ok" else 1)
        self.run = None


@hookimpl
def rlhfkit_register_loggers(register):
    register("wandb", WandbLogger, WandbConfig)
