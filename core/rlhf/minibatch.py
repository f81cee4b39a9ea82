"""The RL update loop every algorithm shares (CleanRL's minibatch loop, multi-rank): how a
step's prompts split into per-rank minibatches, and the minibatch / micro-batch / gradient
accumulation / denominator plumbing around an algorithm's loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Backend, Engine
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.rollout import Experience, micro_batches


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


@dataclass
class MicroBatch:
    """One micro-batch of a minibatch, as an algorithm's loss function sees it."""

    rows: torch.Tensor  # (b,) indices into the rollout's rows (for per-row tensors: advantages[rows])
    exp: Experience  # those rows, trimmed to their longest response: (b, R') per-token tensors
    denom: torch.Tensor | float  # the whole minibatch's count over every rank (tokens or rows)
    first: bool  # the minibatch's first micro-batch (PPO-ptx adds its SFT batch once, here)


LossFn = Callable[[MicroBatch], tuple[Sequence[torch.Tensor], dict[str, float]]]
"""micro-batch -> (one loss per engine, in the engines' order; metrics). Losses are sums over
the micro-batch divided by ``denom``. Metrics named ``loss/*`` and ``policy/entropy`` are such
partial sums and add up over micro-batches; the others are weighted by the micro-batch's
share of the minibatch's tokens."""


def minibatch_updates(exp: Experience, engines: Sequence[Engine], loss_fn: LossFn, *, backend: Backend,
                      rows_per_minibatch: int, micro_batch_size: int, order: torch.Tensor | None = None,
                      per: str = "token") -> list[dict[str, float]]:
    """One pass over this rank's rollout rows (in ``order``; default: as they are) in
    minibatches of ``rows_per_minibatch`` rows, one optimizer step per minibatch and engine;
    the metrics of each minibatch, with ``grad_norm`` of the first engine.

    The multi-rank rules live here. Every rank runs the same number of minibatches
    (:func:`minibatch_size` made ``rows_per_minibatch`` alike on every rank). A minibatch is
    cut into length-bucketed micro-batches of ``micro_batch_size`` rows (0: whole), whose
    gradients accumulate, with ``boundary`` on the last (where DDP and DeepSpeed
    synchronise). Each loss is divided by the minibatch's count over all ranks (``per``:
    ``token`` or ``row``, :func:`rlhfkit.rlhf.masked.dp_denominator`), so that the backends'
    average of the ranks' gradients is the gradient of the global minibatch mean."""
    reduce = backend.all_reduce_sum if backend.world_size > 1 else None
    mask = exp.mask  # (B, R)
    order = torch.arange(mask.shape[0]) if order is None else order
    stats = []
    for start in range(0, len(order), rows_per_minibatch):
        idx = order[start : start + rows_per_minibatch]
        denom = dp_denominator(mask[idx].sum() if per == "token" else float(len(idx)), reduce, backend.world_size)
        parts = micro_batches(exp, idx, micro_batch_size)
        st: dict[str, float] = {}
        for j, (rows, sub) in enumerate(parts):
            losses, metrics = loss_fn(MicroBatch(rows, sub, denom, first=j == 0))
            for engine, loss in zip(engines, losses):
                engine.backward(loss, boundary=j == len(parts) - 1)
            share = sub.mask.sum().item() / max(mask[idx].sum().item(), 1.0)
            for k, v in metrics.items():
                st[k] = st.get(k, 0.0) + (v if k.startswith("loss/") or k == "policy/entropy" else v * share)
        st["grad_norm"] = engines[0].step()
        for engine in engines[1:]:
            engine.step()
        stats.append(st)
    return stats


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """The minibatches' metrics averaged."""
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
