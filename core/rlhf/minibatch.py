"""How the prompts of an RL step split into per-rank minibatches."""

from __future__ import annotations

from rlhfkit.errors import ConfigError


def minibatch_size(prompts: int, world_size: int, num_minibatches: int) -> int:
    """Prompts per minibatch on each rank: the step's ``prompts`` split evenly over the
    ranks, each share cut into ``num_minibatches`` equal minibatches. Anything uneven raises,
    alike on every rank: ranks running different numbers of optimizer steps would hang under
    data parallelism, and leftover rollouts would be dropped. Runs check this up front
    (:meth:`rlhfkit.config.RunInfo.check_minibatches`)."""
    unit = world_size * num_minibatches
    if prompts % unit:
        raise ConfigError(
            f"rl.prompts_per_step={prompts}: must be a multiple of {unit} (world size {world_size} x "
            f"algorithm.num_minibatches={num_minibatches}), so that every rank runs the same optimizer steps on "
            f"equal minibatches and no rollout is dropped")
    return prompts // unit
