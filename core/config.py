"""The run-level config schema. Plugin configs are the plugins' own dataclasses; here are
only the pipeline's stage settings. Stored in Hydra's ConfigStore as ``rlhfkit_base``.
:func:`validate_run` checks a composed config, plugins' settings included, before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from rlhfkit.interfaces import RolloutConfig, ScoringConfig
from rlhfkit.registry import MULTI_GROUPS, NAME_KEY, Registry
from rlhfkit.rlhf.minibatch import minibatch_size
from rlhfkit.settings import Invalid, bounded, check_keys, check_values


class RMLoss(str, Enum):
    kwise = "kwise"
    """InstructGPT: all C(K,2) pairs of a prompt form one batch element."""
    pairwise = "pairwise"
    """One (chosen, rejected) pair per batch element."""


@dataclass
class SFTConfig:
    steps: int = bounded(500, ge=1)
    """Optimizer steps."""
    batch_size: int = bounded(32, ge=1)
    """Demonstrations per step."""
    lr: float = bounded(3e-3, gt=0)
    """Peak learning rate of the cosine schedule."""
    warmup_steps: int = bounded(25, ge=0)
    """Linear warmup before the cosine decay."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Cosine floor, as a fraction of ``lr``."""
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping norm (0: no clipping)."""
    mask_prompt: bool = True
    """Train on response tokens only (prompt tokens get no loss)."""
    packing: bool = True
    """Pack several demonstrations into each row (block-diagonal attention, positions
    restart per demonstration): no padding, no cross-example attention."""
    pack_length: int = bounded(256, ge=1)
    """Tokens per packed row."""
    log_every: int = bounded(25, ge=1)


@dataclass
class RMConfig:
    loss: RMLoss = RMLoss.kwise
    """kwise (InstructGPT) or pairwise."""
    epochs: int = bounded(2, ge=1)
    batch_size: int = bounded(16, ge=1)
    """Prompts (kwise) or pairs (pairwise) per step."""
    lr: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(10, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    normalize: bool = True
    """Shift rewards so the SFT demonstrations score mean 0."""
    log_every: int = bounded(25, ge=1)


@dataclass
class RLConfig:
    steps: int = bounded(60, ge=1)
    """RL iterations (each: rollout, scoring, update)."""
    prompts_per_step: int = bounded(64, ge=1)
    """Rollout batch size."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Micro-batching of the scoring and training passes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (policy and critic): less memory, ~30%
    more compute."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate on held-out prompts every N iterations (0: only at the end)."""
    log_every: int = bounded(5, ge=1)


@dataclass
class EvalConfig:
    num_prompts: int = bounded(256, ge=1)
    """Held-out prompts (each stage is evaluated on the same ones)."""
    batch_size: int = bounded(128, ge=1)
    num_samples_logged: int = bounded(4, ge=0)


class OnDivergence(str, Enum):
    rollback = "rollback"
    """Reload the stage's last good checkpoint and continue with a lower learning rate."""
    stop = "stop"
    """Stop the run with a report (``divergence.json``) and exit code 3."""


class BadData(str, Enum):
    error = "error"
    """Stop at the first bad record, naming its file, line and field."""
    skip = "skip"
    """Skip bad records, count them by reason, and report the counts."""


@dataclass
class CheckpointConfig:
    every: int = bounded(50, ge=0)
    """Write a training checkpoint every N optimizer steps of each stage (0: never). It
    holds the weights, optimizer and scheduler states, RNG states, data position, step
    counters and the algorithm's state (KL controller)."""
    keep_last: int = bounded(2, ge=1)
    """Complete training checkpoints kept per stage; older ones are deleted."""


@dataclass
class GuardConfig:
    """Divergence guards. A step whose loss or gradient norm is not finite is always
    skipped (the engines do it); these settings decide what happens after several."""

    max_bad_steps: int = bounded(3, ge=1)
    """Consecutive bad steps (skipped, or past ``kl_bound``) that trip the guard."""
    on_divergence: OnDivergence = OnDivergence.rollback
    """rollback (to the last good checkpoint, with a lower learning rate) or stop."""
    lr_factor: float = bounded(0.5, gt=0, le=1)
    """Learning-rate multiplier applied at each rollback."""
    max_rollbacks: int = bounded(3, ge=0)
    """Rollbacks allowed per stage before the guard stops the run."""
    kl_bound: Optional[float] = None
    """RL: a step whose rollout KL to the SFT policy (nats per response) exceeds this is a
    bad step (null: no bound)."""


@dataclass
class RunConfig:
    # plugin groups: filled by the defaults list from the plugins' own schemas
    policy: Any = None
    reward_model: Any = None
    reward_head: Any = None
    algorithm: Any = None
    data: Any = None
    backend: Any = None
    logger: Any = None
    generator: Any = None
    experiment: Any = None
    hparams_search: Any = None

    seed: int = bounded(0, ge=0)
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "rl"])
    """Stages to run, in order. A stage not run takes its checkpoint from ``from_run``."""
    from_run: Optional[str] = None
    """A previous run directory whose stage checkpoints feed the stages not run here."""
    resume: Any = False
    """true: continue the run in ``hydra.run.dir`` (or the newest run under ``outputs/``)
    from its last completed stage and last good checkpoint; or a run directory to continue.
    The run's own overrides are reused; overrides given now are applied on top."""
    bad_data: BadData = BadData.error
    """A malformed or unusable data record (bad JSON, missing or empty field, a prompt
    longer than the context): error, or skip and count."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    objective: str = "gold_improvement"
    """What a run returns to a Hydra sweeper (Optuna): a key of the final evaluation table
    (gold_improvement, win_rate), or policy/metric (rl/gold, rl/kl)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, run: RunInfo) -> None:
        if not self.stages or any(s not in STAGES for s in self.stages):
            raise Invalid("stages", list(self.stages), f"each must be one of {list(STAGES)}")
        if "rl" in self.stages:
            from rlhfkit.rlhf.rollout import check_rl_rollout  # torch-heavy: only when RL runs

            check_rl_rollout(self.rl.rollout)


STAGES = ("sft", "rm", "rl")


@dataclass(frozen=True)
class RunInfo:
    """What a schema's ``validate(run)`` may check its own settings against."""

    stages: tuple[str, ...]
    world_size: int
    """Data-parallel ranks: 1 for a single-process backend, else the launcher's WORLD_SIZE."""
    rl: RLConfig

    def check_minibatches(self, num_minibatches: int) -> None:
        """For RL algorithms that cut each step's rollouts into ``num_minibatches``
        optimizer steps: the prompts split evenly over ranks and minibatches."""
        if "rl" in self.stages:
            minibatch_size(self.rl.prompts_per_step, self.world_size, num_minibatches)


def validate_run(cfg: DictConfig, registry: Registry) -> RunInfo:
    """Check every setting of a composed run config before any work starts: no unknown
    keys under a typed node, every field in its declared range (see :mod:`rlhfkit.settings`),
    then each schema's own ``validate``. The first bad setting raises a one-line
    :class:`ConfigError` that names it."""
    groups = registry.groups()
    check_keys(cfg, RunConfig, "")
    plugins: list[tuple[str, str, Any]] = []  # (group, path, node)
    for group in groups:
        node = cfg.get(group)
        if node is None:
            continue
        if group in MULTI_GROUPS:
            plugins += [(group, f"{group}.{name}", sub) for name, sub in node.items()]
        else:
            plugins.append((group, group, node))
    typed = []
    for group, path, node in plugins:
        if isinstance(node, DictConfig) and node.get(NAME_KEY) is not None:
            check_keys(node, registry.get(group, str(node[NAME_KEY])).stored_schema, path)
        typed.append((group, path, *registry.config_of(group, node)))
    base = cfg.copy()
    with open_dict(base):
        for group in groups:
            base[group] = None
    run_cfg: RunConfig = OmegaConf.to_object(base)
    backend = next((entry for group, _, entry, _ in typed if group == "backend"), None)
    fixed = getattr(backend.factory, "world_size", None) if backend is not None else 1  # SingleDevice.world_size = 1
    world_size = fixed if isinstance(fixed, int) else int(os.environ.get("WORLD_SIZE", "1"))
    run = RunInfo(stages=tuple(run_cfg.stages), world_size=world_size, rl=run_cfg.rl)
    check_values(run_cfg, "", run)
    for _, path, _, config in typed:
        check_values(config, path, run)
    return run


def store_base_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlhfkit_base", node=RunConfig)
