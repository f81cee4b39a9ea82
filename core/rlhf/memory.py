"""Trading compute for memory: activation (gradient) checkpointing."""

from __future__ import annotations

import torch

from rlhfkit.errors import ConfigError


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"rl.gradient_checkpointing=true, but {type(model).__name__} does not support it.")
