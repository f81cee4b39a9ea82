"""``backend=ddp``: torch DistributedDataParallel, one process per device.

Launch with ``torchrun --nproc_per_node=N -m rlhfkit.cli backend=ddp ...``. Each rank
trains on its share of every global batch; gradients are averaged by DDP, and the losses
are normalised by the global token count, so N ranks follow one process's trajectory.
Frozen models (reference, reward) are replicated on every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.backends import common
from rlhfkit.plugins.backends.single import autocast_for
from rlhfkit.settings import one_of


@dataclass
class DDPConfig:
    dist_backend: str = one_of("auto", "nccl", "gloo")
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    precision: str = one_of("fp32", "bf16")
    """fp32, or bf16 autocast."""
    find_unused_parameters: bool = False
    """Pass to DistributedDataParallel (only for models with branches unused per step)."""


class DDPBackend(common.Collectives):
    def __init__(self, cfg: DDPConfig):
        if cfg.precision not in ("fp32", "bf16"):
            raise ConfigError(f"backend.precision={cfg.precision!r}: choose fp32 or bf16.")
        self.cfg = cfg
        self.rank, self.world_size, local_rank = common.init_distributed(cfg.dist_backend)
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def prepare(self, model, optimizer, scheduler=None, max_grad_norm=None, batch_size=None) -> common.LocalEngine:
        model.to(self.device).train()
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.find_unused_parameters,
            # the models' buffers are constants (rotary tables, position ids, reward_head=logprob's
            # frozen vocab x hidden copy of the LM head), identical on every rank from the start:
            # re-broadcasting them before every forward would only cost time
            broadcast_buffers=False,
        )
        return common.LocalEngine(model, optimizer, scheduler, max_grad_norm, forward=ddp, is_main=self.is_main,
                                  any_rank=self.any_rank if self.world_size > 1 else None)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device).eval().requires_grad_(False)
        return model

    def autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def gathered(self, module: torch.nn.Module):
        return contextlib.nullcontext()  # replicated: every rank holds the full weights


@hookimpl
def rlhfkit_register_backends(register):
    register("ddp", DDPBackend, DDPConfig)
