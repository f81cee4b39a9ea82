"""Packing.

* **Packed rows** ``(N, pack_length)``: several sequences per row with a block-diagonal
  causal mask (B, 1, L, L) and positions restarting per sequence: no padding waste and no
  attention across examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, 1, L, L) bool, block-diagonal causal
    position_ids: torch.Tensor  # (N, L)
    loss_mask: torch.Tensor  # (N, L)
    row: torch.Tensor  # (N, L): which input row each position holds (-1: padding)


def pack(
    rows: Sequence[tuple[list[int], int]], pack_length: int, pad_id: int, mask_prompt: bool, device: torch.device
) -> Packed:
    """Greedy first-fit packing of (ids, prompt_len) rows into rows of ``pack_length``."""
    bins: list[list[tuple[int, list[int], int]]] = []
    space: list[int] = []
    for r, (ids, plen) in sorted(enumerate(rows), key=lambda r: -len(r[1][0])):
        ids = ids[:pack_length]
        for b, free in enumerate(space):
            if len(ids) <= free:
                bins[b].append((r, ids, plen))
                space[b] -= len(ids)
                break
        else:
            bins.append([(r, ids, plen)])
            space.append(pack_length - len(ids))
    width = max(pack_length - s for s in space)
    n = len(bins)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    row = torch.full((n, width), -1, dtype=torch.long)
    for i, b in enumerate(bins):
        at = 0
        for s, (r, ids, plen) in enumerate(b):
            input_ids[i, at : at + len(ids)] = torch.tensor(ids)
            segment[i, at : at + len(ids)] = s
            row[i, at : at + len(ids)] = r
            pos[i, at : at + len(ids)] = torch.arange(len(ids))
            loss_mask[i, at + (plen if mask_prompt else 1) : at + len(ids)] = 1
            at += len(ids)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    attn = (same & causal)[:, None]
    # padded positions attend to themselves so their softmax is defined (they carry no loss)
    attn |= torch.eye(width, dtype=torch.bool)[None, None]
    return Packed(input_ids.to(device), attn.to(device), pos.to(device), loss_mask.to(device), row.to(device))
