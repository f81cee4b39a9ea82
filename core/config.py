"""The run-level config schema. Plugin and stage configs are the plugins' own dataclasses;
here are only the run's own settings, and :func:`run_schema`, which puts them together. Stored
in Hydra's ConfigStore as ``rlhfkit_base``.
:func:`validate_run` checks a composed config, plugins' settings included, before any work."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import RolloutConfig
from rlhfkit.registry import GROUPS, MULTI_GROUPS, NAME_KEY, STAGE_GROUP, Registry
from rlhfkit.settings import Invalid, bounded, check_keys, check_values


@dataclass
class EvalConfig:
    num_prompts: int = bounded(256, ge=1)
    """Held-out prompts (each stage is evaluated on the same ones)."""
    batch_size: int = bounded(128, ge=1)
    samples_per_prompt: int = bounded(1, ge=1)
    """Responses sampled per held-out prompt; every metric averages over all of them. With one,
    the difference of two policies' pass rates on 223 prompts has a sampling noise of about
    +/-0.03 (one standard deviation): as large as the gains it is meant to show."""
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
class RunSettings:
    """The run's own settings. The full run schema (:func:`run_schema`) adds a field per
    component group (filled by the defaults list from the plugins' schemas) and one per
    registered stage (its config at the top-level key of its name: ``sft.steps=100``)."""

    experiment: Any = None
    hparams_search: Any = None

    seed: int = bounded(0, ge=0)
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "rl"])
    """Stages to run, in order, by name (group ``stage``). A product a stage needs and no
    earlier stage makes comes from ``from_run``."""
    from_run: Optional[str] = None
    """A previous run directory whose stage products feed the stages run here."""
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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How responses are sampled: for RL, the reward model's comparisons and evaluation."""
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, run: RunInfo) -> None:
        unknown = [s for s in self.stages if s not in run.known_stages]
        if not self.stages or unknown:
            raise Invalid("stages", list(self.stages), f"each must be one of {list(run.known_stages)}")


def run_schema(registry: Registry) -> type:
    """The run config's dataclass: :class:`RunSettings`, a field per component group of
    :data:`rlhfkit.hookspecs.GROUPS`, and a field per registered stage holding its schema."""
    own = {f.name for f in fields(RunSettings)}
    for entry in registry.entries(STAGE_GROUP):
        if entry.name in own or entry.name in GROUPS:
            raise ConfigError(f"Package '{entry.package}' registers a stage named '{entry.name}', which is a run "
                              "setting of its own: rename the stage.")
    groups = tuple(g for g in registry.groups() if g != STAGE_GROUP)
    return _run_schema(groups, tuple((e.name, e.schema) for e in registry.entries(STAGE_GROUP)))


@functools.lru_cache(maxsize=None)
def _run_schema(groups: tuple[str, ...], stages: tuple[tuple[str, type], ...]) -> type:
    extra: list[tuple[str, Any, Any]] = [(group, Any, field(default=None)) for group in groups]
    extra += [(name, schema, field(default_factory=schema)) for name, schema in stages]
    return make_dataclass("RunConfig", extra, bases=(RunSettings,), namespace={"__module__": __name__})


@dataclass(frozen=True)
class RunInfo:
    """What a schema's ``validate(run)`` may check its own settings against."""

    stages: tuple[str, ...]
    world_size: int
    """Data-parallel ranks: 1 for a single-process backend, else the launcher's WORLD_SIZE."""
    settings: Any
    """The whole typed run config (a :func:`run_schema` instance): every stage's settings
    at ``settings.<stage>``, the sampling settings at ``settings.rollout``."""
    known_stages: tuple[str, ...] = ()

    def check_minibatches(self, num_minibatches: int) -> None:
        """For RL algorithms that cut each step's rollouts into ``num_minibatches``
        optimizer steps: the prompts split evenly over ranks and minibatches."""
        from rlhfkit.rlhf.minibatch import minibatch_size

        rl = getattr(self.settings, "rl", None)
        if "rl" in self.stages and rl is not None:
            minibatch_size(rl.prompts_per_step, self.world_size, num_minibatches)


def validate_run(cfg: DictConfig, registry: Registry) -> RunInfo:
    """Check every setting of a composed run config before any work starts: no unknown
    keys under a typed node, every field in its declared range (see :mod:`rlhfkit.settings`),
    then each schema's own ``validate``. The first bad setting raises a one-line
    :class:`ConfigError` that names it."""
    groups = registry.groups()
    check_keys(cfg, run_schema(registry), "")
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
            if group != STAGE_GROUP:
                base[group] = None
    run_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(run_schema(registry)), base))
    backend = next((entry for group, _, entry, _ in typed if group == "backend"), None)
    fixed = getattr(backend.factory, "world_size", None) if backend is not None else 1  # SingleDevice.world_size = 1
    world_size = fixed if isinstance(fixed, int) else int(os.environ.get("WORLD_SIZE", "1"))
    run = RunInfo(stages=tuple(run_cfg.stages), world_size=world_size, settings=run_cfg,
                  known_stages=tuple(registry.names(STAGE_GROUP)))
    check_values(run_cfg, "", run)
    for _, path, _, config in typed:
        check_values(config, path, run)
    return run


def store_base_config(registry: Registry) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlhfkit_base", node=run_schema(registry))
