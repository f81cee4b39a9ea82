"""Tokenising prompts and responses into the tensors every stage uses, sampling with a KV
cache, and packing. Pure tensor code: no plugin state.

Layouts
-------
* **Rollout** ``(B, P + R)``: prompts left-padded to width P, then responses of width R,
  right-padded after EOS. The logits for response token t sit at position P + t - 1.
* **Scored sequence** ``(B, L)``: prompt + response + EOS, right-padded (SFT, RM).
* **Packed rows** ``(N, pack_length)``: several sequences per row with a block-diagonal
  causal mask (B, 1, L, L) and positions restarting per sequence: no padding waste and no
  attention across examples.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from rlhfkit.fused import chosen_logprobs
from rlhfkit.interfaces import RolloutConfig


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): 0-based positions that skip left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, (B, P)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    out = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return out.to(device), mask.to(device)


@dataclass
class Encoded:
    """Right-padded prompt+response sequences."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    loss_mask: torch.Tensor  # (B, L): 1 where the token is a target (response, incl. EOS)


def tokenize_pair(tokenizer: Any, prompt: str, response: str, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS), and the prompt's length in tokens."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if add_eos:
        r = r + [tokenizer.eos_token_id]
    return p + r, len(p)


def pad_rows(rows: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device, mask_prompt: bool = True) -> Encoded:
    """Right-pad (ids, prompt_len) rows. The loss mask covers the response (or, without
    ``mask_prompt``, every token but the first)."""
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, plen) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        loss_mask[i, (plen if mask_prompt else 1) : len(ids)] = 1
    return Encoded(ids_t.to(device), mask.to(device), loss_mask.to(device))


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], device: torch.device, add_eos: bool = True,
    max_length: int | None = None,
) -> Encoded:
    """Right-padded prompt + response rows, each cut to ``max_length`` tokens (the model's
    context) if given."""
    rows = [tokenize_pair(tokenizer, p, r, add_eos) for p, r in zip(prompts, responses)]
    if max_length:
        rows = [(ids[:max_length], min(plen, max_length)) for ids, plen in rows]
    return pad_rows(rows, tokenizer.pad_token_id, device)


@dataclass
class Packed:
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, 1, L, L) bool, block-diagonal causal
    position_ids: torch.Tensor  # (N, L)
    loss_mask: torch.Tensor  # (N, L)


def pack(
    rows: Sequence[tuple[list[int], int]], pack_length: int, pad_id: int, mask_prompt: bool, device: torch.device
) -> Packed:
    """Greedy first-fit packing of (ids, prompt_len) rows into rows of ``pack_length``."""
    bins: list[list[tuple[list[int], int]]] = []
    space: list[int] = []
    for ids, plen in sorted(rows, key=lambda r: -len(r[0])):
        ids = ids[:pack_length]
        for b, free in enumerate(space):
            if len(ids) <= free:
                bins[b].append((ids, plen))
                space[b] -= len(ids)
                break
        else:
            bins.append([(ids, plen)])
            space.append(pack_length - len(ids))
    width = max(pack_length - s for s in space)
    n = len(bins)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    for i, b in enumerate(bins):
        at = 0
        for s, (ids, plen) in enumerate(b):
            input_ids[i, at : at + len(ids)] = torch.tensor(ids)
            segment[i, at : at + len(ids)] = s
            pos[i, at : at + len(ids)] = torch.arange(len(ids))
            loss_mask[i, at + (plen if mask_prompt else 1) : at + len(ids)] = 1
            at += len(ids)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    attn = (same & causal)[:, None]
    # padded positions attend to themselves so their softmax is defined (they carry no loss)
    attn |= torch.eye(width, dtype=torch.bool)[None, None]
    return Packed(input_ids.to(device), attn.to(device), pos.to(device), loss_mask.to(device))


def causal_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, denom: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over target positions. logits (B, L, V). ``denom``
    replaces the local target count (see :func:`rlhfkit.rl.dp_denominator`)."""
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)


def n_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """How many positions :func:`causal_lm_loss` averages over."""
    return loss_mask[:, 1:].sum().float()


# --- rollouts ------------------------------------------------------------------------


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

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx], prompt_width=self.prompt_width,
            response_mask=self.response_mask[idx], logprobs=self.logprobs[idx], ended=self.ended[idx],
            responses=[self.responses[i] for i in idx.tolist()],
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
            ended=self.ended, responses=self.responses,
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


def _with_fp32_lm_head(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(model, ...)`` inside :func:`fp32_lm_head` of its ``model``."""

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with fp32_lm_head(model):
            return fn(model, *args, **kwargs)

    return wrapper


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
    :func:`fp32_lm_head`).

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
    )


def decode_responses(tokenizer: Any, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    out = []
    eos = tokenizer.eos_token_id
    for row, m in zip(response.tolist(), response_mask.tolist()):
        toks = [t for t, v in zip(row, m) if v and t != eos]
        out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out


def response_logits(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(B, R, V): the logits that predict each response token. Only the last R + 1
    positions go through the LM head (``logits_to_keep``): prompt positions never pay for
    the vocabulary projection."""
    R = rollout.response_mask.shape[1]
    kw = dict(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids)
    with fp32_lm_head(model):
        try:
            logits = model(**kw, logits_to_keep=R + 1).logits
        except TypeError:  # a model without logits_to_keep: project every position
            logits = model(**kw).logits
    return logits[:, -(R + 1) : -1]


_UNFUSABLE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's linear LM head, or None (no such head, or one whose weight is a ZeRO-3
    shard that only the module's own forward gathers)."""
    inner = getattr(model, "module", model)  # engines wrap the model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head.weight, "ds_id"):
        return None
    return head


def _lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear LM head the fused path can use, or None (see :func:`_plain_head`;
    or a model whose logits are not the head's output)."""
    if getattr(model, "module", model) in _UNFUSABLE:
        return None
    return _plain_head(model)


@contextlib.contextmanager
def fp32_lm_head(model: torch.nn.Module) -> Iterator[None]:
    """Within: ``model``'s LM head projects in fp32 even under autocast or with bf16/fp16
    weights. Logits rounded to bf16 are off by up to half a unit in the last place (0.03 at a
    logit of 8), and so are the logprobs made from them; sampling and every scoring pass
    keep the head in fp32, as :mod:`rlhfkit.fused` does. A no-op in full precision and for
    a head this cannot reach (ZeRO-3 shards)."""
    head = _plain_head(model)
    device = head.weight.device.type if head is not None else "cpu"
    if (head is None or "forward" in head.__dict__  # already inside
            or not (torch.is_autocast_enabled(device) or head.weight.dtype in (torch.bfloat16, torch.float16))):
        yield
        return
    dtype = torch.promote_types(head.weight.dtype, torch.float32)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, enabled=False):
            bias = None if head.bias is None else head.bias.to(dtype)
            return F.linear(hidden.to(dtype), head.weight.to(dtype), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def response_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log pi(y_t | x, y_<t) of the response tokens at ``temperature``, and (B, R)
    entropies (detached: a metric). Where the model's logits are a plain linear head on its
    last hidden state, the head runs chunk by chunk through :mod:`rlhfkit.fused`, and no
    (B, R, V) logits tensor is kept. Whether that holds is checked on every call: the model's
    own logits for the last position must equal the head applied to its hidden state (a
    model with logit soft-capping or scaling fails the check and takes the plain path)."""
    from rlhfkit.rl import entropy_from_logits, logprobs_from_logits

    R = rollout.response_mask.shape[1]
    tokens = rollout.response_ids
    head = _lm_head(model)
    if head is not None:
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=rollout.position_ids, logits_to_keep=1, output_hidden_states=True)
        last = out.hidden_states[-1]
        with torch.no_grad():
            mine = F.linear(last[:, -1], head.weight, head.bias).float()
            same = torch.allclose(mine, out.logits[:, -1].float(), atol=1e-3, rtol=1e-3)
        if same:
            return chosen_logprobs(last[:, -(R + 1) : -1], head.weight, head.bias, tokens, temperature)
        _UNFUSABLE.add(getattr(model, "module", model))
    logits = response_logits(model, rollout)
    return logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits.detach(), temperature)


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (None: the policy's own)."""
    if a is None or b is None or a is b:
        return True
    try:
        return a.get_vocab() == b.get_vocab()
    except (AttributeError, NotImplementedError):
        return False


class Retokenized(torch.nn.Module):
    """A reward model with its own tokenizer, called on the policy's token ids: the ids
    are decoded to text and encoded with the reward model's tokenizer (plus its EOS), cut to
    ``max_length``. Scores only: a critic must read the policy's own tokens."""

    def __init__(self, reward_model: torch.nn.Module, reward_tokenizer: Any, policy_tokenizer: Any, max_length: int | None):
        super().__init__()
        self.reward_model = reward_model
        self.reward_tokenizer, self.policy_tokenizer, self.max_length = reward_tokenizer, policy_tokenizer, max_length

    @property
    def bias(self) -> torch.Tensor:
        return self.reward_model.bias

    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        return [self.policy_tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                for ids, m in zip(input_ids, attention_mask)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        if per_token:
            raise ValueError("A re-tokenized reward model gives sequence scores only; per-token values need the policy's tokens.")
        texts = self.texts(input_ids, attention_mask)
        e = encode_pairs(self.reward_tokenizer, texts, [""] * len(texts), input_ids.device, max_length=self.max_length)
        return self.reward_model(e.input_ids, e.attention_mask)
