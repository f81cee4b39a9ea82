"""``backend=single``: one process on the CPU or one GPU, with optional bf16 autocast."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.backends.common import LocalEngine
from rlhfkit.settings import one_of


@dataclass
class SingleConfig:
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    precision: str = one_of("fp32", "bf16")
    """fp32, or bf16 (autocast the forward passes; weights and optimizer stay fp32)."""


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SingleDevice:
    rank = 0
    world_size = 1

    def __init__(self, cfg: SingleConfig):
        if cfg.precision not in ("fp32", "bf16"):
            raise ConfigError(f"backend.precision={cfg.precision!r}: choose fp32 or bf16.")
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("backend.device=cuda but no CUDA device is available. Use backend.device=cpu.")
        self.device = torch.device(cfg.device)
        self.cfg = cfg

    @property
    def is_main(self) -> bool:
        return True

    def prepare(self, model, optimizer, scheduler=None, max_grad_norm=None, batch_size=None) -> LocalEngine:
        model.to(self.device).train()
        return LocalEngine(model, optimizer, scheduler, max_grad_norm)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device).eval().requires_grad_(False)
        return model

    def autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        return list(items)

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def gathered(self, module: torch.nn.Module):
        return contextlib.nullcontext()


@hookimpl
def rlhfkit_register_backends(register):
    register("single", SingleDevice, SingleConfig)
