import pytest
import torch

from rlhfkit.rlhf.kl import AdaptiveKLController, FixedKLController, kl_penalised_rewards


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


def test_kl_penalised_rewards_puts_score_on_last_token():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(scores, logp, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, 0.0, 2.0], [-0.25, -1.0, 0.0]]))
