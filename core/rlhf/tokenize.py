"""Tokenising prompts and responses into the tensors every stage uses.

Layouts
-------
* **Prompts** ``(B, P)``: left-padded (the rollout layout's first part, see
  :mod:`rlhfkit.rlhf.sampling`).
* **Scored sequence** ``(B, L)``: prompt + response + EOS, right-padded (SFT, RM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


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
