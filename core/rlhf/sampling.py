"""Sampling with a KV cache.

* **Rollout** ``(B, P + R)``: prompts left-padded to width P, then responses of width R,
  right-padded after EOS. The logits for response token t sit at position P + t - 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhfkit.interfaces import RolloutConfig
from rlhfkit.rlhf.logprobs import _with_fp32_lm_head
from rlhfkit.rlhf.tokenize import encode_prompts, positions


@dataclass
class Rollout:
    """Sampled responses in the rollout layout."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_width: int  # P
    response_mask: torch.Tensor  # (B, R): 1 up to and including EOS
    logprobs: torch.Tensor  # (B, R): log pi(y_t) at the sampling temperature
    ended: torch.Tensor  # (B,) bool: produced EOS
    responses: list[str]
    prompts: list[str] = field(default_factory=list)
    """The prompt of each row, as text (reward functions that check an answer read it)."""

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def sequence_response_mask(self) -> torch.Tensor:
        """(B, P + R): ``response_mask`` in the whole sequence's columns."""
        return torch.nn.functional.pad(self.response_mask, (self.prompt_width, 0)).to(self.attention_mask.dtype)

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx], prompt_width=self.prompt_width,
            response_mask=self.response_mask[idx], logprobs=self.logprobs[idx], ended=self.ended[idx],
            responses=[self.responses[i] for i in idx.tolist()],
            prompts=[self.prompts[i] for i in idx.tolist()] if self.prompts else [],
        )

    def trimmed(self) -> "Rollout":
        """The same rows without the padding columns every row has: left padding shared
        by all prompts and right padding past the longest response. Used on length
        buckets, so short rows are not scored at the batch's full width."""
        P = self.prompt_width
        left = int((self.attention_mask[:, :P] == 0).all(0).long().cumprod(0).sum())
        R = max(int(self.response_mask.sum(-1).max()), 1)
        return Rollout(
            input_ids=self.input_ids[:, left : P + R], attention_mask=self.attention_mask[:, left : P + R],
            prompt_width=P - left, response_mask=self.response_mask[:, :R], logprobs=self.logprobs[:, :R],
            ended=self.ended, responses=self.responses, prompts=self.prompts,
        )


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities, (B,) uniforms -> (B,) token ids: the first token whose CDF
    reaches u. Same distribution as multinomial, but a token depends only on its own
    uniform, so a row samples the same whatever batch or rank it is in."""
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)


def draw_uniforms(n_rows: int, max_new_tokens: int) -> torch.Tensor:
    """(n_rows, T) uniforms from the global RNG. Draw them for the *global* batch on every
    rank (same seed, same stream) and hand each rank its rows: sampling is then independent
    of the world size."""
    return torch.rand(n_rows, max_new_tokens)


def _static_cache(model: torch.nn.Module, max_len: int) -> Any | None:
    """A preallocated KV cache of ``max_len`` positions, or None where the model's cache
    cannot be static (then the sampler falls back to the growing dynamic cache).

    Keys and values are stored in one dtype, the wider of the two. Under autocast a RoPE
    model (Llama, Qwen, ...) hands the cache fp32 keys (the rotation multiplies bf16 keys by
    fp32 cos/sin) and bf16 values; transformers' StaticCache allocates both in the keys'
    dtype and then cannot copy bf16 values in. Widening the values is lossless: attention
    sees exactly what the dynamic cache and a full forward pass give it."""
    try:
        return _one_dtype_static_cache()(config=model.config, max_cache_len=max_len)
    except Exception:  # no config, or an architecture without static-cache support
        return None


@functools.cache
def _one_dtype_static_cache() -> type:
    """The class, made once (a compiled decode step guards on the cache's type)."""
    from transformers import StaticCache

    class OneDtypeStaticCache(StaticCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            dtype = torch.promote_types(key_states.dtype, value_states.dtype)
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)

    return OneDtypeStaticCache


@torch.no_grad()
@_with_fp32_lm_head
def sample(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: RolloutConfig, device: torch.device,
    greedy: bool = False, uniforms: torch.Tensor | None = None, any_alive: Callable[[bool], bool] | None = None,
    static_cache: bool = True, decode: Callable[..., Any] | None = None,
) -> Rollout:
    """Batched sampling of left-padded prompts with a KV cache. Stops once every sequence
    has produced EOS. The logprob of each sampled token comes out of the same forward pass,
    at the sampling temperature and before top-k/top-p filtering (the distribution the
    trainer scores: RL refuses top-k/top-p), with the LM head in fp32 (see
    :func:`rlhfkit.rlhf.logprobs.fp32_lm_head`).

    ``static_cache``: preallocate the cache and the attention mask for P + max_new_tokens
    positions, so every decode step has the same shapes (what CUDA graphs and
    ``torch.compile`` need) and nothing is reallocated per token. ``decode`` replaces
    ``model`` for the decode steps (a compiled version of it, say).

    ``uniforms`` (B, max_new_tokens) drive the sampling (drawn here if None). Under sharded
    models (ZeRO-3) every rank must run the same number of forward passes: ``any_alive``
    turns this rank's "still generating" into "any rank still generating"."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    B, P = ids.shape
    T = cfg.max_new_tokens
    if uniforms is None:
        uniforms = draw_uniforms(B, T)
    uniforms = uniforms.to(device)
    cache = _static_cache(model, P + T) if static_cache else None
    pos = positions(prompt_mask)
    if cache is not None:
        mask = torch.zeros((B, P + T), dtype=torch.long, device=device)  # filled as tokens arrive
        mask[:, :P] = prompt_mask
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(P, device=device))
    else:
        mask = prompt_mask
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
    logits = out.logits[:, -1]
    step = decode if decode is not None else model
    next_pos = pos[:, -1:] + 1  # (B, 1)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    tokens = torch.full((B, T), pad, dtype=torch.long, device=device)
    logps = torch.zeros((B, T), device=device)
    valid = torch.zeros((B, T), dtype=torch.bool, device=device)
    R = T
    for t in range(T):
        scaled = logits.float() / cfg.temperature
        if greedy:
            tok = scaled.argmax(-1)
        else:
            tok = _inverse_cdf(_filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(-1), uniforms[:, t])
        logp = scaled.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad))
        tokens[:, t] = tok
        logps[:, t] = torch.where(alive, logp, torch.zeros_like(logp))
        valid[:, t] = alive
        alive = alive & (tok != eos)
        still = bool(alive.any())
        if any_alive is not None:
            still = any_alive(still)
        if not still or t == T - 1:
            R = t + 1
            break
        if mask.shape[1] == P + T:  # static: write this token's slot
            mask[:, P + t] = valid[:, t].long()
            out = step(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                       use_cache=True, cache_position=torch.full((1,), P + t, dtype=torch.long, device=device))
        else:
            mask = torch.cat([mask, valid[:, t : t + 1].long()], dim=1)
            out = step(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    response, response_mask, logps = tokens[:, :R], valid[:, :R].long(), logps[:, :R]
    ended = (response == eos).any(-1)
    texts = decode_responses(tokenizer, response, response_mask)
    return Rollout(
        input_ids=torch.cat([ids, response], 1),
        attention_mask=torch.cat([prompt_mask, response_mask], 1),
        prompt_width=P,
        response_mask=response_mask,
        logprobs=logps,
        ended=ended,
        responses=texts,
        prompts=list(prompts),
    )


def decode_responses(tokenizer: Any, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    out = []
    eos = tokenizer.eos_token_id
    for row, m in zip(response.tolist(), response_mask.tolist()):
        toks = [t for t, v in zip(row, m) if v and t != eos]
        out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out
