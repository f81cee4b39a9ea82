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
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.backends import common
from rlhfkit.settings import one_of


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
    frozen_models: str = one_of("replicate", "shard")
    """replicate, or shard (ZeRO-3 inference engines) the reference and reward models."""
    dist_backend: str = one_of("auto", "nccl", "gloo")
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

    def __init__(self, engine, any_rank: Callable[[bool], bool]):
        self.engine = engine
        self.module = engine.module
        self._any_rank = any_rank
        self._bad = False
        self.skipped_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        # A non-finite loss on any rank: no backward for the rest of this optimizer step,
        # on every rank (ZeRO would otherwise reduce NaN gradients into the partitions).
        self._bad = self._bad or self._any_rank(not bool(torch.isfinite(loss.detach()).all()))
        if self._bad:
            return
        # accumulating micro-batches: reduce and step only at the last one
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self) -> float:
        """Step; a non-finite loss (checked here) or gradient (ZeRO's overflow check)
        skips the update and counts it in ``skipped_steps``."""
        if self._bad:
            self._bad = False
            self.engine.zero_grad()
            self.skipped_steps += 1
            return float("nan")
        self.engine.step()
        if not self.engine.was_step_applied():
            self.skipped_steps += 1
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def scale_lr(self, factor: float) -> None:
        common.scale_lr(self.engine.optimizer, self.engine.lr_scheduler, factor)

    def state_dict(self) -> dict[str, Any]:
        return {}  # sharded across ranks: see save_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_state(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="state", client_state={"rlhfkit_skipped_steps": self.skipped_steps})

    def load_state(self, path: str) -> None:
        with _weights_only_loads(self.engine):
            _, client = self.engine.load_checkpoint(path, tag="state", load_module_strict=True)
        self.skipped_steps = int((client or {}).get("rlhfkit_skipped_steps", 0))


@contextlib.contextmanager
def _weights_only_loads(engine):
    """DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which
    runs whatever a pickle says. Read them with ``weights_only=True`` instead, allowing only
    the few plain DeepSpeed types its checkpoints hold."""
    from rlhfkit.checkpoint import load_tensors

    ckpt = engine.checkpoint_engine
    original = ckpt.load

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return load_tensors(path, allowed="tensors and DeepSpeed's plain types", map_location=map_location)

    ckpt.load = load
    try:
        yield
    finally:
        ckpt.load = original


def _deepspeed_safe_globals() -> list[Any]:
    out: list[Any] = []
    for module, names in {
        "deepspeed.runtime.fp16.loss_scaler": ["LossScaler", "DynamicLossScaler"],
        "deepspeed.runtime.zero.config": ["ZeroStageEnum"],
        "deepspeed.utils.tensor_fragment": ["fragment_address"],
        "deepspeed.runtime.zero.offload_config": ["OffloadDeviceEnum"],
    }.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


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
        return DeepSpeedEngineAdapter(engine, self.any_rank)

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
