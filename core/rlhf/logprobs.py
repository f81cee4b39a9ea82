"""Logprobs and entropies from logits, and the policy's logprobs of response tokens: the
LM head in fp32, fused through :mod:`rlhfkit.rlhf.fused` where the model allows."""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F

from rlhfkit.rlhf.fused import chosen_logprobs
from rlhfkit.rlhf.retokenize import unwrapped

if TYPE_CHECKING:
    from rlhfkit.rlhf.sampling import Rollout


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T): log pi(token) at ``temperature`` (the same one used to
    sample, per the "N+ implementation details")."""
    logits = logits.float() / temperature
    # gather - logsumexp: no (B, T, V) log-softmax tensor is kept for the backward pass
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _with_fp32_lm_head(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(model, ...)`` inside :func:`fp32_lm_head` of its ``model``."""

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with fp32_lm_head(model):
            return fn(model, *args, **kwargs)

    return wrapper


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
    inner = unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head.weight, "ds_id"):
        return None
    return head


def _lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear LM head the fused path can use, or None (see :func:`_plain_head`;
    or a model whose logits are not the head's output)."""
    if unwrapped(model) in _UNFUSABLE:
        return None
    return _plain_head(model)


@contextlib.contextmanager
def fp32_lm_head(model: torch.nn.Module) -> Iterator[None]:
    """Within: ``model``'s LM head projects in fp32 even under autocast or with bf16/fp16
    weights. Logits rounded to bf16 are off by up to half a unit in the last place (0.03 at a
    logit of 8), and so are the logprobs made from them; sampling and every scoring pass
    keep the head in fp32, as :mod:`rlhfkit.rlhf.fused` does. A no-op in full precision and for
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
    last hidden state, the head runs chunk by chunk through :mod:`rlhfkit.rlhf.fused`, and no
    (B, R, V) logits tensor is kept. Whether that holds is checked on every call: the model's
    own logits for the last position must equal the head applied to its hidden state (a
    model with logit soft-capping or scaling fails the check and takes the plain path)."""
    R = rollout.response_mask.shape[1]
    tokens = rollout.response_ids
    head = _lm_head(model)
    if head is not None:
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=rollout.position_ids, logits_to_keep=1, output_hidden_states=True)
        last = out.hidden_states[-1]
        if _head_made_logits(model, head, last, out.logits):
            return chosen_logprobs(last[:, -(R + 1) : -1], head.weight, head.bias, tokens, temperature)
    logits = response_logits(model, rollout)
    return logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits.detach(), temperature)


def _head_made_logits(model: torch.nn.Module, head: torch.nn.Linear, last: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's logits for the last position are ``head`` applied to its last
    hidden state (else the model is remembered as unfusable)."""
    with torch.no_grad():
        mine = F.linear(last[:, -1], head.weight, head.bias).float()
        same = torch.allclose(mine, logits[:, -1].float(), atol=1e-3, rtol=1e-3)
    if not same:
        _UNFUSABLE.add(unwrapped(model))
    return same


def target_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                    **forward: Any) -> torch.Tensor:
    """(n,) log pi(input_ids[b, t] | input_ids[b, :t]) of every token with ``targets[b, t]``
    set, (B, L), in row-major order, at temperature 1: the logprobs of a dataset's
    responses (DPO), in padded or packed rows (``forward``: ``attention_mask`` and
    ``position_ids``). Only the positions that predict a target go through the LM head
    (fused, as in :func:`response_logprobs`, where the model allows): prompts and padding
    never pay for the vocabulary projection."""
    where = targets[:, 1:].bool()  # position t predicts token t + 1
    tokens = input_ids[:, 1:][where]  # (n,)
    head = _lm_head(model)
    if head is not None:
        out = model(input_ids=input_ids, **forward, logits_to_keep=1, output_hidden_states=True)
        last = out.hidden_states[-1]
        if _head_made_logits(model, head, last, out.logits):
            return chosen_logprobs(last[:, :-1][where], head.weight, head.bias, tokens)[0]
    with fp32_lm_head(model):
        logits = model(input_ids=input_ids, **forward).logits
    return logprobs_from_logits(logits[:, :-1][where], tokens)


def logprobs_and_entropy(model: torch.nn.Module, rollout: Rollout, temperature: float,
                         entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, R) logprobs and entropies of a rollout's response tokens. With ``entropy_grad``
    (an entropy bonus in the loss) from the full logits, so that the entropy carries its
    gradient; otherwise from the fused LM head, the entropy only a metric."""
    if entropy_grad:
        logits = response_logits(model, rollout)  # (b, R, V)
        return logprobs_from_logits(logits, rollout.response_ids, temperature), entropy_from_logits(logits, temperature)
    return response_logprobs(model, rollout, temperature)
