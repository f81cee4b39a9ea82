"""The run-level config schema. Plugin configs are the plugins' own dataclasses; here are
only the pipeline's stage settings. Stored in Hydra's ConfigStore as ``rlhfkit_base``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from rlhfkit.interfaces import RolloutConfig, ScoringConfig


class RMLoss(str, Enum):
    kwise = "kwise"
    """InstructGPT: all C(K,2) pairs of a prompt form one batch element."""
    pairwise = "pairwise"
    """One (chosen, rejected) pair per batch element."""


@dataclass
class SFTConfig:
    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Demonstrations per step."""
    lr: float = 3e-3
    """Peak learning rate of the cosine schedule."""
    warmup_steps: int = 25
    """Linear warmup before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine floor, as a fraction of ``lr``."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mask_prompt: bool = True
    """Train on response tokens only (prompt tokens get no loss)."""
    packing: bool = True
    """Pack several demonstrations into each row (block-diagonal attention, positions
    restart per demonstration): no padding, no cross-example attention."""
    pack_length: int = 256
    """Tokens per packed row."""
    log_every: int = 25


@dataclass
class RMConfig:
    loss: RMLoss = RMLoss.kwise
    """kwise (InstructGPT) or pairwise."""
    epochs: int = 2
    batch_size: int = 16
    """Prompts (kwise) or pairs (pairwise) per step."""
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    normalize: bool = True
    """Shift rewards so the SFT demonstrations score mean 0."""
    log_every: int = 25


@dataclass
class RLConfig:
    steps: int = 60
    """RL iterations (each: rollout, scoring, update)."""
    prompts_per_step: int = 64
    """Rollout batch size."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Micro-batching of the scoring and training passes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (policy and critic): less memory, ~30%
    more compute."""
    eval_every: int = 0
    """Evaluate on held-out prompts every N iterations (0: only at the end)."""
    log_every: int = 5


@dataclass
class EvalConfig:
    num_prompts: int = 256
    """Held-out prompts (each stage is evaluated on the same ones)."""
    batch_size: int = 128
    num_samples_logged: int = 4


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
    every: int = 50
    """Write a training checkpoint every N optimizer steps of each stage (0: never). It
    holds the weights, optimizer and scheduler states, RNG states, data position, step
    counters and the algorithm's state (KL controller)."""
    keep_last: int = 2
    """Complete training checkpoints kept per stage; older ones are deleted."""


@dataclass
class GuardConfig:
    """Divergence guards. A step whose loss or gradient norm is not finite is always
    skipped (the engines do it); these settings decide what happens after several."""

    max_bad_steps: int = 3
    """Consecutive bad steps (skipped, or past ``kl_bound``) that trip the guard."""
    on_divergence: OnDivergence = OnDivergence.rollback
    """rollback (to the last good checkpoint, with a lower learning rate) or stop."""
    lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback."""
    max_rollbacks: int = 3
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

    seed: int = 0
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


STAGES = ("sft", "rm", "rl")


def store_base_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlhfkit_base", node=RunConfig)
