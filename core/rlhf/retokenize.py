"""Reward models with their own tokenizer, scored on the policy's token ids."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from rlhfkit.data import context_length
from rlhfkit.interfaces import RewardModel, optional
from rlhfkit.rlhf.tokenize import encode_pairs


def reward_model_context(rm: Any) -> int | None:
    """The context length of a reward model (or of the model a backend wrapped, ``.module``)."""
    inner = unwrapped(rm)
    return context_length(optional(inner, RewardModel, "backbone") or inner)


def unwrapped(rm: Any) -> Any:
    """The model a backend or ``torch.compile`` wrapped (``.module`` of engines, DDP and
    DeepSpeed, ``._orig_mod`` of a compiled module, followed down), or ``rm``."""
    while True:
        inner = getattr(rm, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(rm, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return rm
        rm = inner


def score(rm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
          response_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) rewards of ``rm`` for right-aligned sequences whose response tokens are
    ``response_mask`` (B, T; None: not known). The mask is passed to reward models whose
    ``forward`` takes ``response_mask`` (a head that averages over the response,
    ``reward_head=logprob``); one that does not is called as ``rm(input_ids, attention_mask)``."""
    forward = unwrapped(rm).forward
    try:
        takes = "response_mask" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return rm(input_ids, attention_mask, response_mask=response_mask)
    return rm(input_ids, attention_mask)


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
        # no response_mask: the re-tokenized text is scored whole (the boundary does not survive decoding)
        if per_token:
            raise ValueError("A re-tokenized reward model gives sequence scores only; per-token values need the policy's tokens.")
        texts = self.texts(input_ids, attention_mask)
        e = encode_pairs(self.reward_tokenizer, texts, [""] * len(texts), input_ids.device, max_length=self.max_length)
        return self.reward_model(e.input_ids, e.attention_mask)
