"""Every hook rlhfkit calls. This file is the plugin API reference.

Two kinds of hooks:

* **Registration hooks** (``rlhfkit_register_*``) are called once per process, when the
  registry is built, with a ``register`` callback bound to one component group. A plugin
  calls ``register(name, factory, schema)`` for each component it provides:

  - ``name``: the one name used everywhere (entry point, ``conf/<group>/<name>.yaml``, CLI
    choice ``<group>=<name>``);
  - ``factory``: called with an instance of ``schema`` (the plugin's own typed config slice,
    never the whole run config) and returning the component;
  - ``schema``: a dataclass; it is stored in Hydra's ConfigStore as ``<group>/<name>`` and
    ``schema/<group>/<name>``, so ``<group>=<name> <group>.<field>=<value>`` works from the
    command line, type-checked, without any YAML file.

  Every implementation is called (not firstresult). Registering a name twice in one group
  is an error naming both packages.

* **Lifecycle hooks** are called on the main process (rank 0) only, on every registered
  plugin that implements them, in pluggy's order (last registered first). Loggers and
  callbacks implement them. Their return values are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from rlhfkit import PROJECT

if TYPE_CHECKING:
    from rlhfkit.registry import Register

hookspec = pluggy.HookspecMarker(PROJECT)


# --- registration hooks: one per component group -------------------------------------


@dataclass(frozen=True)
class Group:
    """A component group: plugins register components into it by name, and a run picks them."""

    name: str
    """The config key and CLI group (``algorithm=ppo``)."""
    hook: str
    """The registration hook (``rlhfkit_register_algorithms``)."""
    returns: str
    """What a factory returns: the Protocol in :mod:`rlhfkit.interfaces`."""
    doc: str
    """What the group is for (the registration hook's docstring)."""
    pick: str = "one"
    """How a run picks: ``one`` (``algorithm=ppo``, config at ``algorithm``); ``many``
    (``logger=[console,jsonl]``, each config at ``logger.<name>``); ``stages``
    (``stages=[sft,rm,rl]``, each config at the top-level key ``<name>``)."""


GROUPS: tuple[Group, ...] = (
    Group("stage", "rlhfkit_register_stages", "Stage",
          "Pipeline stages (group ``stage``), picked in order by ``stages=[sft,rm,rl]``. A stage declares the "
          "products it needs (``sft``, ``rm``) and the data it reads, and writes its own product; its config "
          "is the top-level key of its name (``sft.steps=100``).", pick="stages"),
    Group("policy", "rlhfkit_register_policies", "PolicyLoader",
          "Policy loaders (group ``policy``): they build the initial policy for SFT and load a policy from "
          "a stage's product."),
    Group("reward_model", "rlhfkit_register_reward_models", "RewardModelLoader",
          "Reward-model builders (group ``reward_model``): they put a reward head (group ``reward_head``) on "
          "a backbone and load a trained reward model from disk."),
    Group("reward_head", "rlhfkit_register_reward_heads", "HeadBuilder",
          "Reward heads (group ``reward_head``): a callable ``hidden_size -> RewardHead`` (a ``torch.nn.Module``)."),
    Group("reward", "rlhfkit_register_rewards", "RewardSource",
          "Reward sources (group ``reward``): what scores RL rollouts. ``reward=model`` is the pipeline's "
          "reward model; a rule, a verifier, a sandboxed test runner or an ensemble plug in the same way."),
    Group("algorithm", "rlhfkit_register_algorithms", "PreferenceOptimizer",
          "RL algorithms (group ``algorithm``), run by the ``rl`` stage. Critic-free algorithms (RLOO, "
          "GRPO, REINFORCE) simply never ask the context for a value model."),
    Group("data", "rlhfkit_register_datasets", "Dataset", "Datasets and task suites (group ``data``)."),
    Group("backend", "rlhfkit_register_backends", "Backend",
          "Execution backends (group ``backend``): single device, DDP, DeepSpeed ZeRO."),
    Group("logger", "rlhfkit_register_loggers", "Logger",
          "Loggers (group ``logger``; several may be on at once: ``logger=[a,b]``): objects implementing "
          "some of the lifecycle hooks below, registered with the plugin manager for the run.", pick="many"),
    Group("generator", "rlhfkit_register_generators", "Generator",
          "Rollout engines (group ``generator``): what samples responses for RL, evaluation and the reward "
          "model's comparisons."),
)
"""Every component group. The registration hooks below, the run config's fields
(:func:`rlhfkit.config.run_schema`) and the building of components
(:class:`rlhfkit.pipeline.Components`) all follow from this table: adding a group is one
entry here."""


def _registration_hook(group: Group):
    def hook(register: Register) -> None: ...

    hook.__name__ = hook.__qualname__ = group.hook
    hook.__doc__ = (f"Register {group.doc[0].lower()}{group.doc[1:]}\n\n    The factory returns a "
                    f":class:`rlhfkit.interfaces.{group.returns}`. Called once per process, on every plugin.")
    return hookspec(hook)


for _group in GROUPS:
    globals()[_group.hook] = _registration_hook(_group)


@hookspec
def rlhfkit_config_search_path() -> list[str]:
    """Return extra Hydra config search-path entries, e.g. ``["pkg://my_plugin.conf"]``.

    Lets a third-party package ship YAML presets (``algorithm=my_algo_fast``) and
    experiments. Called once before composing the config; all results are appended in
    order after rlhfkit's own ``conf/``.
    """


# --- lifecycle hooks: rank 0 only ------------------------------------------------------


@hookspec
def rlhfkit_run_start(run_dir: str, config: dict[str, Any]) -> None:
    """The run is starting. ``config`` is the resolved config as plain containers.

    Called once per run, after the run directory exists and before the first stage.
    """


@hookspec
def rlhfkit_log_metrics(stage: str, step: int, metrics: dict[str, float]) -> None:
    """Metrics after a training step or evaluation of ``stage`` (``sft``, ``rm``, ``rl``).

    ``step`` counts optimizer steps within the stage. Metric names are stable, ``/``-
    separated (``loss/policy``, ``rollout/kl``, ``reward/gold``, ``perf/tokens_per_s``).
    Called after every logged step.
    """


@hookspec
def rlhfkit_progress(stage: str, step: int, total: int) -> None:
    """``stage`` finished step ``step`` of ``total`` (for progress bars and ETAs).

    Called after every optimizer step of SFT and RM and every RL iteration, also the
    unlogged ones; cheap hook implementations only.
    """


@hookspec
def rlhfkit_log_samples(stage: str, step: int, rows: list[dict[str, Any]]) -> None:
    """Sample completions (``prompt``, ``response``, rewards) for inspection.

    Called after each evaluation with a few rows.
    """


@hookspec
def rlhfkit_checkpoint_saved(stage: str, path: str) -> None:
    """A checkpoint of ``stage`` was written, atomically and completely, at ``path``.

    Called once per saved checkpoint.
    """


@hookspec
def rlhfkit_run_end(run_dir: str, summary: dict[str, Any]) -> None:
    """The run finished; ``summary`` holds the final evaluation table.

    Called once per run, also when a stage raised (then ``summary["status"]`` is
    ``"failed"`` and ``summary["error"]`` holds the message).
    """
