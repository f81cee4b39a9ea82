"""Supervised losses: the reward model's (InstructGPT's K-wise loss and the plain pairwise
loss) and SFT's (next-token cross-entropy)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, denom: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(r_chosen - r_rejected), mean over pairs. (M,), (M,) -> loss, accuracy.
    ``denom`` replaces the pair count (see :func:`rlhfkit.rlhf.masked.dp_denominator`)."""
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).sum() / (len(margin) if denom is None else denom)
    return loss, (margin > 0).float().mean()


def comparison_pairs(scores: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every strictly ordered pair within each group of completions laid end to end.

    Returns (win, lose, group), each (M,): indices into the flattened completions and the
    group (prompt) each pair belongs to. Ties give no pair.
    """
    win, lose, group = [], [], []
    offset = 0
    for g, s in enumerate(scores):
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                if s[i] != s[j]:
                    a, b = (i, j) if s[i] > s[j] else (j, i)
                    win.append(offset + a)
                    lose.append(offset + b)
                    group.append(g)
        offset += len(s)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)
    return as_t(win), as_t(lose), as_t(group)


def kwise_loss(
    rewards: torch.Tensor, win: torch.Tensor, lose: torch.Tensor, group: torch.Tensor, n_groups: int,
    denom: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT eq. 1: loss = -1/C(K,2) * sum over pairs of log sigmoid(r_w - r_l), per
    prompt, averaged over prompts. Each completion is forwarded once (``rewards`` (N,) holds
    every completion of the batch) and all C(K,2) pairs of a prompt are one batch element,
    which is what keeps the RM from over-fitting to repeated completions. ``denom``
    replaces the number of prompts with pairs (see :func:`rlhfkit.rlhf.masked.dp_denominator`)."""
    win, lose, group = win.to(rewards.device), lose.to(rewards.device), group.to(rewards.device)
    margin = rewards[win] - rewards[lose]  # (M,)
    return group_mean(-F.logsigmoid(margin), group, n_groups, denom), (margin > 0).float().mean()


def group_mean(per_pair: torch.Tensor, group: torch.Tensor, n_groups: int,
               denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """The mean of ``per_pair`` (M,) over each group's pairs, then over the groups that have
    pairs (InstructGPT eq. 1's weighting: a prompt's C(K,2) pairs are one batch element).
    ``denom`` replaces the number of groups with pairs (see
    :func:`rlhfkit.rlhf.masked.dp_denominator`)."""
    group = group.to(per_pair.device)
    counts = torch.zeros(n_groups, device=per_pair.device).index_add_(0, group, torch.ones(len(per_pair), device=per_pair.device))
    per_group = torch.zeros(n_groups, device=per_pair.device, dtype=per_pair.dtype).index_add_(0, group, per_pair)
    has_pairs = counts > 0
    per_prompt = per_group[has_pairs] / counts[has_pairs]
    return per_prompt.sum() / (len(per_prompt) if denom is None else denom)


def causal_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, denom: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over target positions. logits (B, L, V). ``denom``
    replaces the local target count (see :func:`rlhfkit.rlhf.masked.dp_denominator`)."""
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)


def n_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """How many positions :func:`causal_lm_loss` averages over."""
    return loss_mask[:, 1:].sum().float()
