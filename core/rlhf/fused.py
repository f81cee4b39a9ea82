"""Logprobs of chosen tokens straight from hidden states, without a (tokens, vocab) logits
tensor kept for the backward pass.

The LM head is applied chunk by chunk; the forward keeps only each token's log-sum-exp.
The backward recomputes each chunk's logits and forms d logits = g * (onehot - softmax) / T
in place, in a few passes over the vocabulary instead of the dozen that autograd's
log-softmax, gather, division and slicing take. The head runs in fp32 whatever the model's
precision (see docs/precision.md). One extra LM-head matmul buys a
vocab-sized tensor fewer in memory (measured: keeping the softmax instead saved only 2%
of the CPU update time). With GPT-2's 50k vocabulary the logits are most of the policy
update's time on CPU and most of its activation memory on GPU.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 1024  # tokens per LM-head chunk


class _ChosenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, tokens, temperature: float, chunk: int):
        # The head projects in fp32 (fp64 for fp64 weights) even under autocast or with bf16
        # weights: bf16 logits would put up to 0.03 nats of rounding into every logprob, and
        # so into the PPO ratio and the KL penalty (the sampler keeps its head in fp32 too).
        cdtype = acc = torch.promote_types(weight.dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            b = None if bias is None else bias.to(cdtype)
            n = hidden.shape[0]
            logp = torch.empty(n, dtype=acc, device=hidden.device)
            entropy = torch.empty_like(logp)
            lse = torch.empty_like(logp)
            for s in range(0, n, chunk):
                logits = torch.nn.functional.linear(hidden[s : s + chunk].to(cdtype), w, b).to(acc).div_(temperature)
                lse_c = torch.logsumexp(logits, -1)
                picked = logits.gather(-1, tokens[s : s + chunk, None]).squeeze(-1)
                logp[s : s + chunk] = picked - lse_c
                lse[s : s + chunk] = lse_c
                # entropy = lse - sum p * logits (a metric: no gradient flows through it)
                entropy[s : s + chunk] = lse_c - (logits.sub(lse_c[:, None]).exp_().mul_(logits)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.chunk, ctx.cdtype, ctx.acc = temperature, chunk, cdtype, acc
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp, grad_entropy):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        T, chunk, cdtype, acc = ctx.temperature, ctx.chunk, ctx.cdtype, ctx.acc
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            b = None if bias is None else bias.to(cdtype)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(cdtype)
                g = grad_logp[s : s + chunk].to(acc) / T
                # d logp / d logits = (onehot - softmax) / T, built in place in the logits buffer
                d = torch.nn.functional.linear(h, w, b).to(acc).div_(T).sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])
                d.scatter_add_(-1, tokens[s : s + chunk, None], g[:, None])
                d = d.to(cdtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (d @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.add_((d.t() @ h).to(acc))
                if grad_b is not None:
                    grad_b.add_(d.to(acc).sum(0))
        return (
            grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype), None, None, None,
        )


def chosen_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
    temperature: float = 1.0, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., H), LM head weight (V, H) and bias, tokens (...) -> (log pi(token),
    entropy), both (...), float32 (float64 for float64 inputs), at ``temperature``. Gradients flow to ``hidden``,
    ``weight`` and ``bias`` through the logprobs; the entropy is a detached metric."""
    shape = tokens.shape
    logp, entropy = _ChosenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1), float(temperature), chunk
    )
    return logp.view(shape), entropy.view(shape)
