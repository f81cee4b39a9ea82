"""``backend=single``: one process on the CPU or one GPU, with optional bf16 autocast."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError


@dataclass
class SingleConfig:
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast the forward passes; weights and optimizer stay fp32)."""


class LocalEngine:
    """A model, its optimizer and scheduler, trained in this process."""

    def __init__(self, module, optimizer, scheduler, max_grad_norm):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


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

    def prepare(self, model, optimizer, scheduler=None, max_grad_norm=None) -> LocalEngine:
        model.to(self.device).train()
        return LocalEngine(model, optimizer, scheduler, max_grad_norm)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device).eval().requires_grad_(False)
        return model

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value


@hookimpl
def rlhfkit_register_backends(register):
    register("single", SingleDevice, SingleConfig)
