import torch

from rlhfkit.rlhf.advantages import gae


def test_gae_gamma_lambda_one_zero_values_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    adv, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    expected = torch.tensor([[10.0, 9.0, 7.0, 4.0], [1.5, 1.0, 2.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)


def test_gae_matches_hand_computation():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.8]])
    m = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.8
    d1 = 0.0 + gamma * 0.8 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, adv + v)


def test_gae_does_not_bootstrap_past_the_end():
    r = torch.tensor([[0.0, 1.0, 0.0]])
    v = torch.tensor([[0.0, 0.0, 100.0]])  # a value after EOS must not leak in
    adv, _ = gae(r, v, torch.tensor([[1.0, 1, 0]]), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 0.0]]))
