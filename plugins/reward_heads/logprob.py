"""``reward_head=logprob`` (the default): a reward model that starts from what the SFT model
knows about the answer, not only from what its last hidden state carries.

A response's score is the sum over its tokens (EOS included) of

    c * log p(y_t | x, y_<t)  +  w . h_t + b

where ``log p`` is the backbone's own next-token log-probability of the token, read through
the language-model head the SFT model was trained with (copied into this head when the
reward model is built, and frozen), and ``h_t`` is the backbone's hidden state at the token.
``c`` starts at ``logprob_weight`` (1), ``w`` and ``b`` at zero (``init_std``), so an
untrained reward model scores a response by the SFT model's log-likelihood of it; ``c``,
``w``, ``b`` and the backbone then train on the comparisons as usual.

Why (``docs/overoptimisation.md``): a linear head on the EOS state (``last_token``) learns
the planted flaw and the length, which that state carries, but not whether the answer is
right, which it barely carries (relative distance 0.05 between the EOS states of a right and
a wrong answer). The SFT model does know whether each answer token is right: that is what
it was trained to predict. Its summed log-probability is -1.8 to -2.7 for the built-in
suites' ideal answers, -7.7 to -11.4 with one position wrong and -13.6 to -23.5 for random
symbols. Starting from it, the reward model keeps that signal and learns the flaw on top:
held-out accuracy rises on every built-in suite (0.659 -> 0.716, 0.742 -> 0.807, 0.577 ->
0.672 on seed 0). A sum, not a mean: a mean over the response rises when high-probability
tokens (a filler word) are added, and an RL policy found that at once.

**Where the linear part reads** (``linear``). ``tokens`` (the default): every response
token's state, ``w . h_t + b`` summed with the log-probabilities, as above. ``last``: only
the last token's state, as ``reward_head=last_token`` reads it, taken relative to the state
just before the response (the prompt's last token, a constant for each prompt)::

    c * sum_t log p(y_t | x, y_<t)  +  w . (h_last - h_before)

so a planted flaw (one more marker, filler or hedge) moves the score by what one state
carries, not once per token, while the log-likelihood term still reads the answer. It is
computed per token as ``w . (h_t - h_{t-1})``, whose sum over the response is the
difference above, so the sum pooling works unchanged (for re-tokenized text, scored without
a response mask, ``h_before`` is the first token's state). As a critic the head gives each
token ``w . h_t + b + c * log p`` either way (:meth:`LogProbHead.value_scores`).
``reward_head=logprob_last`` is this head with ``linear=last``: the default ensemble members
(``rm.member_heads``), which read the answer as member 0 does and extrapolate the flaw
differently from it (README "Reward-model ensembles").

The sum runs over the response's tokens when the caller says which they are (the ``rm``
stage, ``reward=model``, ``reward=ensemble``: :func:`rlhfkit.rlhf.retokenize.score`); a
reward model fed re-tokenized text (another vocabulary) sums over every token but the first.
As a critic (PPO, A2C) the per-token scores are the initial values; the value at token ``t``
reads tokens up to ``t`` only.

Cost: one LM-head projection per forward, chunked and fused like the policy's
(:mod:`rlhfkit.rlhf.fused`: fp32 even under autocast, no ``(B, T, vocab)`` logits kept for the
backward pass). The fp32 copy of the LM head (vocab x hidden) is saved with each reward model
(``reward_head.safetensors``); in memory, heads bound to equal copies on one device share one
(an ensemble's members, and a critic built from the reward model), so K members cost one copy,
not K: 2 GB each for a 128k x 4096 head. For models whose logits are not
``h @ lm_head.T`` (soft-capped or scaled logits, as Gemma 2's) the term is close to their
log-probability, not equal.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.reward_heads.last_token import linear_scorer
from rlhfkit.rlhf.fused import chosen_logprobs
from rlhfkit.rlhf.masked import masked_mean
from rlhfkit.settings import Invalid, bounded, one_of

LINEAR = ("tokens", "last")
"""Where a logprob head's linear part reads: every response token's state, or the last one's."""


@dataclass
class LogProbConfig:
    init_std: float = bounded(0.0, ge=0)
    """Std of the linear part's initial weights (0: zeros)."""
    pool: str = one_of("sum", "mean")
    """How the per-token scores make the reward: ``sum`` over the response's tokens, or their
    ``mean``, which padding with high-probability tokens raises (an exploitable reward
    model, as ``experiment=overoptimization`` wants)."""
    logprob_weight: float = bounded(1.0, ge=0)
    """Initial weight ``c`` of the token log-probabilities (learned; 0: a linear score summed
    over the response, which knows only what the hidden states carry)."""
    linear: str = one_of(*LINEAR)
    """Where the learned linear part reads the hidden states: ``tokens``, every response
    token's (summed); ``last``, the last token's, relative to the state before the response
    (``reward_head=logprob_last``). ``last`` needs ``pool=sum``."""

    def validate(self, run: object = None) -> None:
        if self.linear == "last" and self.pool != "sum":
            raise Invalid("linear", self.linear, "the last token's linear score is a difference summed over the "
                          "response, not averaged: set reward_head.pool=sum, or reward_head.linear=tokens")


@dataclass
class LogProbLastConfig(LogProbConfig):
    """``reward_head=logprob``'s settings with the linear part on the last token."""

    linear: str = one_of(*LINEAR, default="last")
    """Where the learned linear part reads the hidden states: ``last``, the last token's,
    relative to the state before the response; ``tokens``, every response token's (summed,
    as ``reward_head=logprob``)."""


# frozen LM-head copies held by bound heads, by shape, device, dtype and a checksum: equal
# ones are shared
_BOUND: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


class LogProbHead(torch.nn.Module):
    reads_tokens = True  # token_scores(hidden, input_ids); pooled over the response's tokens

    def __init__(self, hidden_size: int, cfg: LogProbConfig):
        super().__init__()
        self.linear = linear_scorer(hidden_size, cfg.init_std)
        # shape (1,), not (): DeepSpeed cannot broadcast a 0-dim parameter
        self.logprob_weight = torch.nn.Parameter(torch.full((1,), float(cfg.logprob_weight)))
        self.pool_kind = cfg.pool  # saved with the reward model, checked when it is loaded
        self.linear_kind = cfg.linear  # the same
        self.register_buffer("unembedding", torch.zeros(0, hidden_size))

    def bind(self, unembedding: torch.Tensor) -> None:
        """Take a frozen fp32 copy of the language-model head's weight, (vocab, hidden): the
        copy another head holds already when it is equal, else a new one. rlhfkit never
        writes the copy in place (loading and moving replace it), so sharing is safe."""
        self._adopt(unembedding.detach().to(torch.float32), copy=True)

    def _adopt(self, weight: torch.Tensor, copy: bool) -> None:
        if weight.is_meta:  # no values to compare (a meta or fake tensor): nothing to share
            self.unembedding = weight
            return
        key = (tuple(weight.shape), str(weight.device), weight.dtype,
               float(weight[:: max(1, len(weight) // 64)].double().sum()))
        held = _BOUND.get(key)
        if held is not None and (held is weight or torch.equal(held, weight)):  # the key fixed shape, device, dtype
            self.unembedding = held
            return
        self.unembedding = weight.clone() if copy else weight
        _BOUND[key] = self.unembedding

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        """``.to(device)`` and the like give each module its own copy of a buffer: share the
        moved copy again with the heads already moved."""
        super()._apply(fn, *args, **kwargs)
        if self.unembedding.numel():
            self._adopt(self.unembedding, copy=False)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs):  # noqa: ANN001
        """The saved LM-head copy is adopted (sharing an equal one), never copied into the
        buffer in place: loading writes no buffer another head shares."""
        key = prefix + "unembedding"
        saved = state_dict.get(key)
        adopt = saved is not None and saved.dim() == 2 and saved.numel() and saved.shape[1] == self.unembedding.shape[1]
        if adopt:  # absent or of another width: torch reports it as it does for any buffer
            here = saved.detach().to(self.unembedding.device, self.unembedding.dtype)  # where the module is, as copy_ would
            self._adopt(here, copy=here.data_ptr() == saved.data_ptr())
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if adopt and key in missing_keys:
            missing_keys.remove(key)

    def token_logprobs(self, hidden: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, T): log p(token t | tokens < t); 0 at the first position."""
        if self.unembedding.numel() == 0 or input_ids is None:
            raise ConfigError("reward_head=logprob reads the SFT model's token log-probabilities, which this reward "
                              "model does not give it (a loader other than reward_model=hf_rm, or a backbone without "
                              "a language-model head): select reward_head=last_token.")
        # fused: fp32 under autocast too, and no (B, T, V) logits kept for the backward pass
        lp, _ = chosen_logprobs(hidden[:, :-1], self.unembedding, None, input_ids[:, 1:])
        return torch.nn.functional.pad(lp, (1, 0))

    def token_scores(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear_kind != "last":
            return self.value_scores(hidden, input_ids)
        linear = self.linear(hidden).squeeze(-1).float()  # fp32: under bf16 the differences would round again
        linear = linear - torch.nn.functional.pad(linear[:, :-1], (1, 0))  # summed: w . (h_last - h_before)
        return linear + self.logprob_weight * self.token_logprobs(hidden, input_ids)

    def value_scores(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) per-token values when the reward model starts a critic: each token's own
        state, ``w . h_t + b + c * log p``, whatever ``linear`` is (with ``last`` the reward's
        differences would leave a value model without its constant ``b``)."""
        return self.linear(hidden).squeeze(-1) + self.logprob_weight * self.token_logprobs(hidden, input_ids)

    def pool(self, token_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum (or mean) over ``mask``: the response's tokens, or every attended token but the
        first (whose log-probability is undefined) when the response is not known."""
        mask = mask.to(token_scores.dtype)
        return masked_mean(token_scores, mask, dim=-1) if self.pool_kind == "mean" else (token_scores * mask).sum(-1)  # (B,)


@hookimpl
def rlhfkit_register_reward_heads(register):
    register("logprob", lambda cfg: (lambda hidden: LogProbHead(hidden, cfg)), LogProbConfig)
    register("logprob_last", lambda cfg: (lambda hidden: LogProbHead(hidden, cfg)), LogProbLastConfig)
