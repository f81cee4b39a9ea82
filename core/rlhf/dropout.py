"""Dropout off, for RL."""

from __future__ import annotations

import torch


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs identical forward passes for sampling and scoring ("N+ details" #3).
    Dropout that a model reads from its config as a plain probability is zeroed at load
    time instead (:func:`rlhfkit.plugins.hf_common.load_model`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
