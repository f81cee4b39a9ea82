"""Offline preference optimisation: the losses of the DPO family on sequence logprobs, and
the pairs a K-wise comparison gives.

Every loss here takes *sequence* logprobs (the sum over a response's tokens of
log pi(y_t | x, y_<t)), token counts where the loss is length-normalised, and returns the
loss of each pair, (M,); :func:`rlhfkit.rlhf.losses.group_mean` reduces them as InstructGPT's
RM loss does (all C(K,2) pairs of a prompt are one batch element). A third-party stage
(KTO, say) reuses the pieces: :func:`log_ratios`, :func:`log1mexp`, :func:`smoothed_logsigmoid`.

Notation: ``w`` is the preferred (chosen) response, ``l`` the dispreferred (rejected) one,
``logps_*`` the policy's sequence logprobs, ``ref_logps_*`` the reference's (the SFT policy),
``lengths_*`` the responses' token counts (EOS included).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rlhfkit.rlhf.logprobs import target_logprobs
from rlhfkit.rlhf.losses import comparison_pairs
from rlhfkit.rlhf.packing import pack
from rlhfkit.rlhf.tokenize import pad_rows


def log_ratios(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x): DPO's implicit reward divided by beta (DPO eq. 5)."""
    return logps - ref_logps


def smoothed_logsigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the binary cross-entropy of ``z``
    against labels flipped with probability ``eps`` (conservative DPO, Mitchell 2023)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_loss(logps_w: torch.Tensor, logps_l: torch.Tensor, ref_logps_w: torch.Tensor, ref_logps_l: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), per pair (M,):

        -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

    With ``label_smoothing`` eps > 0: cDPO, the same loss against labels flipped with
    probability eps. As beta -> 0 the loss is log 2 - beta * margin / 2 + O(beta^2): its
    gradient is -beta/2 times the gradient of the log-ratio difference."""
    margin = log_ratios(logps_w, ref_logps_w) - log_ratios(logps_l, ref_logps_l)
    return smoothed_logsigmoid(beta * margin, label_smoothing)


def ipo_loss(logps_w: torch.Tensor, logps_l: torch.Tensor, ref_logps_w: torch.Tensor, ref_logps_l: torch.Tensor,
             lengths_w: torch.Tensor, lengths_l: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), per pair (M,): (h - 1/(2 beta))^2, h the difference
    of the two responses' log-ratios, each averaged over its tokens (the length
    normalisation the IPO authors used for their results, as TRL does). The minimum, 0, is
    at h = 1/(2 beta): IPO pulls the margin to a finite target instead of to infinity."""
    h = log_ratios(logps_w, ref_logps_w) / lengths_w - log_ratios(logps_l, ref_logps_l) / lengths_l
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(logps_w: torch.Tensor, logps_l: torch.Tensor, lengths_w: torch.Tensor, lengths_l: torch.Tensor,
               beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), per pair (M,), reference-free:

        -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)

    The implicit reward is the length-normalised logprob (eq. 4); ``gamma`` is the target
    reward margin."""
    return smoothed_logsigmoid(beta * (logps_w / lengths_w - logps_l / lengths_l) - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_loss(logps_w: torch.Tensor, logps_l: torch.Tensor, lengths_w: torch.Tensor,
                    lengths_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's preference term (Hong et al. 2024, eqs. 4-7), per pair (M,), reference-free:

        L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),  odds(y) = P(y) / (1 - P(y))

    with P(y) the geometric mean of the response's token probabilities (exp of the
    length-normalised logprob). Returns (L_OR, the log odds ratio). ORPO's loss is
    ``L_SFT + lambda * L_OR`` (eq. 6), the SFT term the NLL of the chosen responses."""
    avg_w, avg_l = (logps_w / lengths_w).clamp(max=-1e-6), (logps_l / lengths_l).clamp(max=-1e-6)  # P < 1
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    return -F.logsigmoid(log_odds), log_odds


def best_vs_rest_pairs(scores: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`rlhfkit.rlhf.losses.comparison_pairs`, but only the pairs of each
    best-scored completion against every completion that scores lower: K - 1 pairs per
    prompt (more when the best is tied) instead of C(K,2). Ties give no pair."""
    win, lose, group = comparison_pairs(scores)
    flat = torch.tensor([s for group_scores in scores for s in group_scores], dtype=torch.float64)
    best = torch.tensor([max(s) for s in scores], dtype=torch.float64)
    keep = flat[win] == best[group]
    return win[keep], lose[keep], group[keep]


def sequence_sums(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """(T,) per-token values and (T,) the sequence each belongs to -> (n,) per-sequence sums
    (the sequence logprob of packed or padded rows)."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, segment, values)


def sequence_logprobs(model: Any, rows: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device,
                      pack_length: int | None = None) -> torch.Tensor:
    """(n,) log pi(response | prompt) of each (ids, prompt tokens) row, summed over the
    response's tokens, every row in one forward pass: packed into rows of ``pack_length``
    tokens (block-diagonal attention; a longer row gets a row of its own length), or, with
    None, right-padded to the longest. Only response tokens go through the LM head
    (:func:`rlhfkit.rlhf.logprobs.target_logprobs`)."""
    rows = [(ids, max(plen, 1)) for ids, plen in rows]  # the first token is never a target
    if pack_length:
        p = pack(rows, max(pack_length, max(len(ids) for ids, _ in rows)), pad_id, True, device)
        ids, targets, row = p.input_ids, p.loss_mask, p.row
        forward = dict(attention_mask=p.attention_mask, position_ids=p.position_ids)
    else:
        e = pad_rows(rows, pad_id, device)
        ids, targets = e.input_ids, e.loss_mask
        row = torch.arange(len(rows), device=device)[:, None].expand_as(ids)
        forward = dict(attention_mask=e.attention_mask)
    logps = target_logprobs(model, ids, targets, **forward)  # (tokens,)
    return sequence_sums(logps, row[:, 1:][targets[:, 1:].bool()], len(rows))


class ReferenceLogprobs:
    """The reference policy's sequence logprob of every training response (``logps``,
    (N,), None until computed), held in a stage's training state (``ctx.train(...,
    state={"reference": cache})``) so that it is checkpointed and restored on resume, never
    recomputed; and each response's token count (``lengths``, (N,), EOS included), which
    also checks that a checkpoint's cache belongs to this run's data."""

    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths
        self.logps: torch.Tensor | None = None
        self.passes = 0  # reference forward passes this process made

    def state_dict(self) -> dict[str, Any]:
        return {"logps": self.logps, "lengths": self.lengths}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["lengths"], self.lengths):
            raise ValueError(f"the checkpoint's reference logprobs are for {len(state['lengths'])} other responses "
                             f"(this run's data has {len(self.lengths)}): the data changed since it was written")
        self.logps = state["logps"]
