import itertools

import pytest
import torch

from rlhfkit.rlhf.losses import comparison_pairs, kwise_loss, pairwise_loss


def _kwise(rewards, scores):
    win, lose, group = comparison_pairs(scores)
    return kwise_loss(rewards, win, lose, group, len(scores))


def test_kwise_with_k2_equals_pairwise():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5), torch.randn(5)
    # five prompts, each with (chosen, rejected) in alternating orders
    rewards, scores = [], []
    for i in range(5):
        if i % 2:
            rewards += [rejected[i], chosen[i]]
            scores.append((0.0, 1.0))
        else:
            rewards += [chosen[i], rejected[i]]
            scores.append((1.0, 0.0))
    k_loss, k_acc = _kwise(torch.stack(rewards), scores)
    p_loss, p_acc = pairwise_loss(chosen, rejected)
    torch.testing.assert_close(k_loss, p_loss)
    torch.testing.assert_close(k_acc, p_acc)


def test_kwise_invariant_to_reordering_completions():
    torch.manual_seed(1)
    rewards = torch.randn(6)
    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    base, _ = _kwise(rewards, [scores])
    for perm in list(itertools.permutations(range(6)))[::97]:
        r = rewards[list(perm)]
        s = [scores[i] for i in perm]
        loss, _ = _kwise(r, [s])
        torch.testing.assert_close(loss, base)


def test_kwise_normalises_by_number_of_pairs_per_prompt():
    # prompt A: K=4 with every pair at margin 1; prompt B: K=2 with margin 1.
    # Normalised per prompt, both contribute -log sigmoid(1), whatever their K.
    a = torch.tensor([3.0, 2.0, 1.0, 0.0])
    a_scores = (4.0, 3.0, 2.0, 1.0)  # margins 1,2,3... not all 1: compute the expected value
    b = torch.tensor([1.0, 0.0])
    loss, _ = _kwise(torch.cat([a, b]), [a_scores, (1.0, 0.0)])
    margins = [a[i] - a[j] for i in range(4) for j in range(i + 1, 4)]
    la = torch.stack([-torch.nn.functional.logsigmoid(m) for m in margins]).mean()
    lb = -torch.nn.functional.logsigmoid(torch.tensor(1.0))
    torch.testing.assert_close(loss, (la + lb) / 2)


def test_ties_give_no_pairs_and_gradient_flows_once_per_completion():
    win, lose, group = comparison_pairs([(1.0, 1.0, 0.0)])
    assert sorted(zip(win.tolist(), lose.tolist())) == [(0, 2), (1, 2)]
    rewards = torch.zeros(3, requires_grad=True)
    loss, _ = kwise_loss(rewards, win, lose, group, 1)
    loss.backward()
    assert rewards.grad[2].item() == pytest.approx(0.5)  # shared by the two pairs, once
    assert rewards.grad[0].item() == pytest.approx(-0.25)
