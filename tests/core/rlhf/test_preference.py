"""The DPO family's losses on hand-made logprobs, against the papers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.rlhf.losses import comparison_pairs, group_mean, kwise_loss
from rlhfkit.rlhf.preference import (
    best_vs_rest_pairs, dpo_loss, ipo_loss, log1mexp, odds_ratio_loss, sequence_sums, simpo_loss,
)


def _logps(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_dpo_at_small_beta_has_the_gradient_of_the_log_ratio_difference():
    """DPO eq. 7 at beta -> 0: loss = log 2 - beta/2 * margin + O(beta^2), so d loss / d logps
    is -beta/2 times d margin / d logps: -1/2 on the chosen, +1/2 on the rejected (scaled by beta)."""
    lw, ll, rw, rl = _logps(-3.0, -7.5), _logps(-4.0, -2.0), torch.tensor([-3.5, -6.0]), torch.tensor([-3.0, -2.5])
    beta = 1e-5
    loss = dpo_loss(lw, ll, rw, rl, beta).sum()
    loss.backward()
    torch.testing.assert_close(lw.grad / beta, torch.full((2,), -0.5, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(ll.grad / beta, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-4, rtol=0)
    margin = (lw - rw) - (ll - rl)
    torch.testing.assert_close(dpo_loss(lw, ll, rw, rl, beta), math.log(2) - beta / 2 * margin, atol=1e-9, rtol=0)
    # at beta = 1 the sigmoid weights the gradient: sigma(-margin), not 1/2
    lw.grad = None
    dpo_loss(lw, ll, rw, rl, 1.0).sum().backward()
    torch.testing.assert_close(lw.grad, -torch.sigmoid(-margin.detach()))


def test_dpo_values_and_label_smoothing():
    lw, ll, rw, rl = torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
    z = 0.5 * ((-2.0 + 3.0) - (-5.0 + 4.0))  # beta * margin = 1
    assert dpo_loss(lw, ll, rw, rl, 0.5).item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))))
    eps = 0.2
    expected = -(1 - eps) * F.logsigmoid(torch.tensor(z)) - eps * F.logsigmoid(torch.tensor(-z))
    assert dpo_loss(lw, ll, rw, rl, 0.5, eps).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_is_at_margin_one_over_two_beta(beta):
    """IPO eq. 17: (h - 1/(2 beta))^2 with h the difference of per-token log-ratios."""
    target = 1 / (2 * beta)
    nw, nl = torch.tensor([4.0]), torch.tensor([2.0])
    ref_w, ref_l = torch.tensor([-8.0]), torch.tensor([-3.0])
    hs = torch.linspace(target - 3, target + 3, 601, dtype=torch.float64)
    # the chosen response's logprob that gives each h (rejected fixed at its reference)
    lw = ref_w + hs * nw
    losses = ipo_loss(lw, ref_l.expand_as(lw), ref_w, ref_l, nw, nl, beta)
    assert hs[losses.argmin()].item() == pytest.approx(target, abs=0.006)
    assert losses.min().item() == pytest.approx(0.0, abs=1e-4)
    at = (ref_w + target * nw).requires_grad_(True)
    ipo_loss(at, ref_l, ref_w, ref_l, nw, nl, beta).sum().backward()
    assert at.grad.abs().item() < 1e-12  # a stationary point, not only the smallest sample


def test_simpo_is_length_normalised_and_reference_free():
    """SimPO eq. 6: doubling a response (twice the tokens, each as likely) leaves its reward
    beta/|y| log pi(y), and so the loss, unchanged; DPO's sequence-level margin doubles."""
    lw, ll, nw, nl = torch.tensor([-6.0]), torch.tensor([-12.0]), torch.tensor([3.0]), torch.tensor([4.0])
    beta, gamma = 2.0, 0.5
    base = simpo_loss(lw, ll, nw, nl, beta, gamma)
    assert base.item() == pytest.approx(-math.log(torch.sigmoid(torch.tensor(beta * (-2.0 + 3.0) - gamma)).item()))
    assert simpo_loss(2 * lw, ll, 2 * nw, nl, beta, gamma).item() == pytest.approx(base.item())
    zero = torch.zeros(1)
    assert dpo_loss(2 * lw, ll, zero, zero, 0.1).item() != pytest.approx(dpo_loss(lw, ll, zero, zero, 0.1).item())
    # gamma is a margin the reward difference must exceed: with gamma the loss is larger
    assert simpo_loss(lw, ll, nw, nl, beta, 0.0).item() < base.item()


def test_orpo_odds_ratio_term_matches_its_definition():
    """ORPO eqs. 4-7: odds(y) = P / (1 - P), P = exp(mean token logprob)."""
    lw, ll, nw, nl = torch.tensor([-1.2]), torch.tensor([-6.0]), torch.tensor([3.0]), torch.tensor([2.0])
    pw, pl = math.exp(-0.4), math.exp(-3.0)
    log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    loss, got = odds_ratio_loss(lw, ll, nw, nl)
    assert got.item() == pytest.approx(log_or, rel=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-log_or)), rel=1e-6)
    x = torch.tensor([-1e-8, -0.1, -0.7, -5.0, -50.0], dtype=torch.float64)
    # each reference in its accurate regime: log(-expm1(x)) near 0, log1p(-exp(x)) far below
    expected = [math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert log1mexp(torch.tensor([-50.0], dtype=torch.float64)).item() < 0  # 1 - exp(x) rounds to 1: not 0 here


def test_kwise_pairs_and_best_vs_rest_with_ties():
    scores = [(3.0, 1.0, 1.0, 2.0), (2.0, 2.0, 1.0), (5.0, 5.0)]  # ties give no pair; the last has none
    win, lose, group = comparison_pairs(scores)
    assert sorted(zip(win.tolist(), lose.tolist())) == [(0, 1), (0, 2), (0, 3), (3, 1), (3, 2), (4, 6), (5, 6)]
    win, lose, group = best_vs_rest_pairs(scores)
    assert sorted(zip(win.tolist(), lose.tolist())) == [(0, 1), (0, 2), (0, 3), (4, 6), (5, 6)]
    assert group.tolist() == [0, 0, 0, 1, 1]


def test_group_mean_weights_each_prompt_once_and_is_the_rm_loss():
    per_pair = torch.tensor([1.0, 2.0, 3.0, 10.0])
    group = torch.tensor([0, 0, 0, 2])  # prompt 1 has no pairs
    assert group_mean(per_pair, group, 3).item() == pytest.approx((2.0 + 10.0) / 2)
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5])
    win, lose, g = comparison_pairs([(3.0, 1.0, 2.0), (1.0, 0.0)])
    loss, _ = kwise_loss(rewards, win, lose, g, 2)
    assert loss.item() == pytest.approx(group_mean(-F.logsigmoid(rewards[win] - rewards[lose]), g, 2).item())


def test_sequence_sums():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sequence_sums(values, torch.tensor([1, 0, 1, 1]), 3).tolist() == [2.0, 8.0, 0.0]
