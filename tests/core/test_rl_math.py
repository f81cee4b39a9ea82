import pytest
import torch

from rlhfkit.rl import (
    AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss, cosine_schedule, gae,
    kl_penalised_rewards, logprobs_from_logits, masked_mean, masked_whiten,
)


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


def test_adaptive_kl_controller_update():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=256)  # error = 0.5 -> clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    c2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c2.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert c2.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    f = FixedKLController(0.3)
    f.update(100.0, 1000)
    assert f.value == 0.3


def test_kl_controller_state_round_trip():
    c = AdaptiveKLController(0.1, 6.0, 100)
    c.update(12.0, 10)
    d = AdaptiveKLController(0.5, 6.0, 100)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value


def test_value_loss_is_clipped():
    old = torch.zeros(1, 2)
    returns = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[1.0, 1.0]], requires_grad=True)  # moved 1.0, clip is 0.2
    loss, clipfrac = clipped_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # clipped value 0.2 -> error 0.8^2; unclipped error 0: the max keeps the clipped one
    assert loss.item() == pytest.approx(0.5 * 0.64)
    assert clipfrac.item() == 1.0
    loss.backward()
    assert torch.all(new.grad == 0)  # the clipped branch carries no gradient to the new value


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = clipped_policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert st["ratio"].item() == pytest.approx(1.0)
    assert st["clipfrac"].item() == 0.0


def test_policy_loss_clips_large_ratio():
    old = torch.zeros(1, 1)
    new = torch.tensor([[1.0]])  # ratio e
    loss, st = clipped_policy_loss(new, old, torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert st["clipfrac"].item() == 1.0


def test_kl_penalised_rewards_puts_score_on_last_token():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(scores, logp, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, 0.0, 2.0], [-0.25, -1.0, 0.0]]))


def test_whiten_and_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, 3].item() == 0.0
    assert w[0, 2].item() == pytest.approx(1.0, rel=1e-4)  # unbiased std of 1,2,3 is 1


def test_logprobs_use_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    tok = torch.tensor([[0]])
    lp1 = logprobs_from_logits(logits, tok, 1.0)
    lp2 = logprobs_from_logits(logits, tok, 2.0)
    assert lp1.item() == pytest.approx(torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0].item())
    assert lp2.item() == pytest.approx(torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0].item())


def test_cosine_schedule():
    f = cosine_schedule(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
