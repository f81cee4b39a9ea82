"""Learning-rate schedules."""

from __future__ import annotations

import math


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
