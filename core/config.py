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
