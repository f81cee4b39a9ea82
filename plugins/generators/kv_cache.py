"""``generator=kv_cache``: rlhfkit's own rollout engine (the default).

Batched sampling of left-padded prompts with a preallocated (static) KV cache, early stop
once every sequence has produced EOS, temperature / top-k / top-p, and the logprobs of the
sampled tokens from the same forward pass. Sampling is world-size invariant: every rank
draws the global batch's uniforms and samples by inverse CDF (see
:func:`rlhfkit.rlhf.sampling.sample`). On GPU, ``compile=reduce-overhead`` compiles the decode
step with CUDA graphs: the static cache keeps its shapes fixed, so it is captured once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.interfaces import RolloutConfig
from rlhfkit.rlhf.sampling import Rollout, sample
from rlhfkit.settings import Invalid, check_values, one_of

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "eager")


@dataclass
class KVCacheConfig:
    static_cache: bool = True
    """Preallocate the KV cache and attention mask for prompt + max_new_tokens positions
    (false: a cache that grows every token)."""
    compile: str = one_of(*COMPILE_MODES)
    """torch.compile the decode step: none, default, reduce-overhead (CUDA graphs),
    max-autotune, or eager (trace only: checks that the step compiles, no speed-up)."""

    def validate(self, run: Any = None) -> None:
        if self.compile != "none" and not self.static_cache:
            raise Invalid("compile", self.compile, "needs generator.static_cache=true (fixed shapes per decode step)")


class KVCacheGenerator:
    def __init__(self, cfg: KVCacheConfig):
        check_values(cfg, "generator", None)  # also when built through the Python API
        self.cfg = cfg
        self._compiled: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[..., Any]]" = weakref.WeakKeyDictionary()

    def decode_step(self, model: torch.nn.Module) -> Callable[..., Any] | None:
        """The (compiled) callable for one-token decode steps, compiled once per model."""
        mode = self.cfg.compile
        if mode == "none":
            return None
        if model not in self._compiled:
            if mode == "eager":
                self._compiled[model] = torch.compile(model, backend="eager", dynamic=False)
            else:
                self._compiled[model] = torch.compile(model, mode=mode, dynamic=False, fullgraph=False)
        return self._compiled[model]

    def __call__(
        self, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: RolloutConfig, device: torch.device, *,
        greedy: bool = False, uniforms: torch.Tensor | None = None, any_alive: Callable[[bool], bool] | None = None,
    ) -> Rollout:
        return sample(model, tokenizer, prompts, cfg, device, greedy=greedy, uniforms=uniforms, any_alive=any_alive,
                      static_cache=self.cfg.static_cache, decode=self.decode_step(model))


@hookimpl
def rlhfkit_register_generators(register):
    register("kv_cache", KVCacheGenerator, KVCacheConfig)
