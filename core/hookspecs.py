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

from typing import TYPE_CHECKING, Any

import pluggy

from rlhfkit import PROJECT

if TYPE_CHECKING:
    from rlhfkit.registry import Register

hookspec = pluggy.HookspecMarker(PROJECT)


# --- registration hooks: one per component group -------------------------------------


@hookspec
def rlhfkit_register_policies(register: Register) -> None:
    """Register policy loaders (group ``policy``).

    The factory returns a :class:`rlhfkit.interfaces.PolicyLoader`: it builds the initial
    policy for SFT and loads a policy from a stage checkpoint. Called once, all plugins.
    """


@hookspec
def rlhfkit_register_reward_models(register: Register) -> None:
    """Register reward-model builders (group ``reward_model``).

    The factory returns a :class:`rlhfkit.interfaces.RewardModelLoader`, which puts a reward
    head (group ``reward_head``) on a backbone and loads a trained reward model from disk.
    Called once, all plugins.
    """


@hookspec
def rlhfkit_register_reward_heads(register: Register) -> None:
    """Register reward heads (group ``reward_head``).

    The factory returns a callable ``hidden_size -> RewardHead`` (a ``torch.nn.Module``, see
    :class:`rlhfkit.interfaces.RewardHead`). Called once, all plugins.
    """


@hookspec
def rlhfkit_register_algorithms(register: Register) -> None:
    """Register preference optimizers: RL and preference algorithms (group ``algorithm``).

    The factory returns a :class:`rlhfkit.interfaces.PreferenceOptimizer`. Critic-free
    algorithms (RLOO, GRPO, REINFORCE) simply never ask the context for a value model.
    Called once, all plugins.
    """


@hookspec
def rlhfkit_register_datasets(register: Register) -> None:
    """Register datasets and task suites (group ``data``).

    The factory returns a :class:`rlhfkit.interfaces.Dataset`. Called once, all plugins.
    """


@hookspec
def rlhfkit_register_backends(register: Register) -> None:
    """Register execution backends (group ``backend``): single device, DDP, DeepSpeed ZeRO.

    The factory returns a :class:`rlhfkit.interfaces.Backend`. Called once, all plugins.
    """


@hookspec
def rlhfkit_register_loggers(register: Register) -> None:
    """Register loggers (group ``logger``; several may be on at once: ``logger=[a,b]``).

    The factory returns an object implementing some of the lifecycle hooks below (see
    :class:`rlhfkit.interfaces.Logger`); the pipeline registers it with the plugin manager
    for the duration of the run. Called once, all plugins.
    """


@hookspec
def rlhfkit_register_generators(register: Register) -> None:
    """Register rollout engines (group ``generator``): what samples responses for RL,
    evaluation and the reward model's comparisons.

    The factory returns a :class:`rlhfkit.interfaces.Generator`. Called once, all plugins.
    """


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
