"""Pieces the built-in backends share: the local engine and torch.distributed helpers.
Functions and one small engine class, not a backend base class."""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

STATE_FILE = "engine_state.pt"
WEIGHTS_FILE = "model.safetensors"


class LocalEngine:
    """A model, its optimizer and scheduler, stepped in this process. ``forward`` may be a
    wrapper of ``module`` (DistributedDataParallel) that syncs gradients; ``any_rank``
    ORs a flag over the ranks so that every rank skips the same steps."""

    def __init__(self, module, optimizer, scheduler, max_grad_norm, forward=None, is_main: bool = True,
                 any_rank: Callable[[bool], bool] | None = None):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self._forward = forward if forward is not None else module
        self._is_main = is_main
        self._any_rank = any_rank
        self._bad_loss = False
        self.skipped_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        self._bad_loss |= not bool(torch.isfinite(loss.detach()).all())
        loss.backward()  # gradients accumulate in .grad until step()

    def step(self) -> float:
        """Clip and step; a non-finite loss or gradient norm skips the update (optimizer
        and scheduler) and counts it in ``skipped_steps``."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        bad = self._bad_loss or not math.isfinite(norm)
        if self._any_rank is not None:
            bad = self._any_rank(bad)
        if bad:
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_loss = False
        return float("nan") if bad and math.isfinite(norm) else norm  # a skipped step never reports a finite norm

    def scale_lr(self, factor: float) -> None:
        scale_lr(self.optimizer, self.scheduler, factor)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def save_state(self, path: str) -> None:
        """The weights (safetensors) and the optimizer and scheduler state (tensors and
        numbers only, read back with ``weights_only=True``)."""
        if self._is_main:  # replicated state: one copy is enough
            from safetensors.torch import save_model

            os.makedirs(path, exist_ok=True)
            save_model(self.module, os.path.join(path, WEIGHTS_FILE))
            torch.save(self.state_dict(), os.path.join(path, STATE_FILE))

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_model

        from rlhfkit.checkpoint import load_tensors

        if os.path.exists(os.path.join(path, WEIGHTS_FILE)):  # in place: the optimizer keeps its parameters
            load_model(self.module, os.path.join(path, WEIGHTS_FILE), strict=True, device=str(_device_of(self.module)))
        self.load_state_dict(load_tensors(os.path.join(path, STATE_FILE), map_location="cpu"))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def scale_lr(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by ``factor`` now and for the rest of the schedule."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    n = len(items)
    return list(items[rank * n // world_size : (rank + 1) * n // world_size])


def init_distributed(dist_backend: str) -> tuple[int, int, int]:
    """Join (or start) the process group that torchrun/deepspeed describe in the
    environment; a plain ``python`` launch becomes a group of one. Returns (rank,
    world_size, local_rank)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # launched without torchrun: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
        if dist_backend == "auto":
            dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=dist_backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(items: list[Any], world_size: int) -> list[Any]:
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


class Collectives:
    """The Backend Protocol's collectives over torch.distributed, for backends whose
    ``rank`` and ``world_size`` attributes describe an initialised process group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value) / self.world_size

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return shard(items, self.rank, self.world_size)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        return gather_objects(items, self.world_size)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)
