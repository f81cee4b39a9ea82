"""Masked statistics over valid positions, and the data-parallel denominator that makes
per-rank means add up to the global mean."""

from __future__ import annotations

from typing import Callable

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over valid positions. ``denom`` replaces the local count: under data
    parallelism pass :func:`dp_denominator` so that averaging gradients over ranks gives the
    mean over every rank's tokens, exactly as one process would."""
    if dim is None:
        return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def dp_denominator(count: torch.Tensor | float, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None, world_size: int) -> torch.Tensor:
    """global count / world size: the per-rank denominator that makes the rank-average of
    per-rank losses (what DDP and ZeRO average) equal the global mean."""
    count = torch.as_tensor(count, dtype=torch.float32)
    if all_reduce_sum is None or world_size == 1:
        return count.clamp(min=1)
    return (all_reduce_sum(count.clone()) / world_size).clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise to unit variance over the valid positions (and zero mean if
    ``shift_mean``). Invalid positions come back as 0. With ``all_reduce_sum``, the
    statistics are over every rank's positions (the whole global batch)."""
    if all_reduce_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = all_reduce_sum(mask.sum().float())
        mean = all_reduce_sum((x * mask).sum().float()) / n.clamp(min=1)
        var = all_reduce_sum((((x - mean) ** 2) * mask).sum().float()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask
