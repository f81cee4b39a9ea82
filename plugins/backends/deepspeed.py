"""``backend=zero1|zero2|zero3|zero2_offload|zero3_offload`` (presets of ``deepspeed``):
DeepSpeed ZeRO data parallelism.

Launch with ``deepspeed --num_gpus N -m rlhfkit.cli backend=zero3 ...`` or
``torchrun --nproc_per_node N -m rlhfkit.cli backend=zero3 ...`` (on CPU:
``DS_ACCELERATOR=cpu``). The DeepSpeed config is ``backend.ds_config``, composed by Hydra:
every key can be overridden (``backend.ds_config.zero_optimization.stage=3``; new keys with
``+``), and ``"auto"`` values are filled per model from the run: the batch sizes from the
stage's global batch and the world size, ``gradient_clipping`` from the stage's
``max_grad_norm``.

Frozen models (the SFT reference, the reward model) are replicated, or, with
``frozen_models=shard`` under ZeRO-3, sharded as inference-only ZeRO-3 engines.
Checkpoints gather the shards into an ordinary Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.backends import common


def _default_ds_config() -> dict[str, Any]:
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"},
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # rlhfkit hands DeepSpeed ordinary torch optimizers; allow them with CPU offload too
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
        "steps_per_print": 1000000000,
    }


@dataclass
class DeepSpeedConfig:
    ds_config: dict[str, Any] = field(default_factory=_default_ds_config)
    """The DeepSpeed config ("auto" values are filled from the run)."""
    frozen_models: str = "replicate"
    """replicate, or shard (ZeRO-3 inference engines) the reference and reward models."""
    dist_backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""


def fill_auto(ds_config: dict[str, Any], batch_size: int | None, world_size: int, max_grad_norm: float | None) -> dict[str, Any]:
    """Replace "auto" values with ones derived from the stage being trained. One
    optimizer step per global batch: micro batch = global batch / world size."""
    cfg = copy.deepcopy(ds_config)
    global_batch = max(batch_size or world_size, world_size)
    micro = max(1, global_batch // world_size)
    auto = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
    }
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    return cfg


class DeepSpeedEngineAdapter:
    """The Engine Protocol over a ``deepspeed.DeepSpeedEngine``."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        # accumulating micro-batches: reduce and step only at the last one
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {}  # sharded across ranks: see save_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_state(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="state")

    def load_state(self, path: str) -> None:
        self.engine.load_checkpoint(path, tag="state", load_module_strict=True)


class DeepSpeedBackend(common.Collectives):
    def __init__(self, cfg: DeepSpeedConfig):
        if cfg.frozen_models not in ("replicate", "shard"):
            raise ConfigError(f"backend.frozen_models={cfg.frozen_models!r}: choose replicate or shard.")
        self.cfg = cfg
        self.ds_config = dict(cfg.ds_config)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"backend.ds_config.zero_optimization.stage={self.stage}: choose 0, 1, 2 or 3.")
        offload_param = self.ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
        if offload_param not in (None, "none") and self.stage != 3:
            raise ConfigError("Parameter offload (zero_optimization.offload_param.device=cpu) needs ZeRO stage 3.")
        if cfg.frozen_models == "shard" and self.stage != 3:
            raise ConfigError("backend.frozen_models=shard needs ZeRO stage 3; use replicate.")
        # DeepSpeed adopts an initialised torch.distributed group in deepspeed.initialize
        self.rank, self.world_size, _ = common.init_distributed(cfg.dist_backend)
        from deepspeed.accelerator import get_accelerator

        self.device = torch.device(get_accelerator().current_device_name())

    def prepare(self, model, optimizer, scheduler=None, max_grad_norm=None, batch_size=None) -> DeepSpeedEngineAdapter:
        import deepspeed

        config = fill_auto(self.ds_config, batch_size, self.world_size, max_grad_norm)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        engine.train()
        return DeepSpeedEngineAdapter(engine)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        if self.cfg.frozen_models == "shard":
            import deepspeed

            config = fill_auto({"zero_optimization": {"stage": 3}, "bf16": self.ds_config.get("bf16", {"enabled": False})},
                               None, self.world_size, None)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return engine
        return model.to(self.device).eval()

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts itself when ds_config.bf16 is enabled

    def gathered(self, module: torch.nn.Module):
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@hookimpl
def rlhfkit_register_backends(register):
    register("deepspeed", DeepSpeedBackend, DeepSpeedConfig)
