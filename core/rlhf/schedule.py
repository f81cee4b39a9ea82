"""Learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def adamw_cosine(params: Iterable[Any], cfg: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its cosine schedule, from a stage config's ``lr``, ``weight_decay``,
    ``warmup_steps`` and ``min_lr_ratio``: the optimiser of the SFT, RM and DPO stages."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = cosine_schedule(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
