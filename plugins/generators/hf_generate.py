"""``generator=hf_generate``: transformers' own ``model.generate``.

For models whose forward the ``kv_cache`` engine cannot drive (a custom cache, say) and as
a reference to compare against. The logprobs come from the same pass (``output_logits``:
the raw logits, at the sampling temperature, before top-k/top-p). ``generate`` samples with
rlhfkit's settings only (max_new_tokens, temperature, top_k, top_p): the checkpoint's own
``generation_config`` (a repetition penalty, say) is ignored, so the sampled distribution is
the one the logprobs score. Unlike ``kv_cache``,
samples depend on the batch and world size (``generate`` draws with ``multinomial``), so
multi-rank runs are not bit-equal to one process. Under ZeRO-3, ranks stay in step with
``synced_gpus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rlhfkit import hookimpl
from rlhfkit.interfaces import RolloutConfig
from rlhfkit.rlhf.logprobs import fp32_lm_head
from rlhfkit.rlhf.sampling import Rollout, _static_cache, decode_responses
from rlhfkit.rlhf.tokenize import encode_prompts
from rlhfkit.settings import one_of


@dataclass
class HFGenerateConfig:
    cache_implementation: str = one_of("dynamic", "static")
    """Passed to generate: dynamic or static."""


class HFGenerator:
    def __init__(self, cfg: HFGenerateConfig):
        self.cfg = cfg

    @torch.no_grad()
    def __call__(
        self, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: RolloutConfig, device: torch.device, *,
        greedy: bool = False, uniforms: torch.Tensor | None = None, any_alive: Callable[[bool], bool] | None = None,
    ) -> Rollout:
        from transformers import GenerationConfig

        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        P = ids.shape[1]
        sampling = {} if greedy else dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        # our own static cache: transformers' cannot hold the mixed key/value dtypes of a RoPE model under autocast
        cache = _static_cache(model, P + cfg.max_new_tokens) if self.cfg.cache_implementation == "static" else None
        settings = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=not greedy, eos_token_id=eos, pad_token_id=pad,
            output_logits=True, return_dict_in_generate=True, **sampling,
            **({} if cache is not None else {"cache_implementation": self.cfg.cache_implementation}),
        )
        # generate fills every setting ours leaves unset from the model's generation_config (a
        # checkpoint's repetition_penalty, top_k=50, ...): those would reshape the sampled
        # distribution, which the logprobs (raw logits) do not see. Lend it a blank one.
        saved, model.generation_config = model.generation_config, GenerationConfig()
        try:
            with fp32_lm_head(model):
                out = model.generate(input_ids=ids, attention_mask=prompt_mask, generation_config=settings,
                                     synced_gpus=any_alive is not None,
                                     **({"past_key_values": cache} if cache is not None else {}))
        finally:
            model.generation_config = saved
        response = out.sequences[:, P:]
        logits = torch.stack(out.logits, 1).float() / cfg.temperature  # (B, R, V), before any filtering
        logprobs = F.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
        # valid up to and including the first EOS
        is_eos = (response == eos).long()
        response_mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()
        response = torch.where(response_mask.bool(), response, torch.full_like(response, pad))
        return Rollout(
            input_ids=torch.cat([ids, response], 1), attention_mask=torch.cat([prompt_mask, response_mask], 1),
            prompt_width=P, response_mask=response_mask, logprobs=logprobs * response_mask,
            ended=(response == eos).any(-1), responses=decode_responses(tokenizer, response, response_mask),
            prompts=list(prompts),
        )


@hookimpl
def rlhfkit_register_generators(register):
    register("hf_generate", HFGenerator, HFGenerateConfig)
