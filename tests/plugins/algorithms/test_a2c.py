import pytest
import torch

from rlhfkit.plugins.algorithms.a2c import A2C, A2CConfig, a2c_policy_loss
from rlhfkit.plugins.algorithms.ppo import PPO


def test_a2c_loss_is_plain_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = a2c_policy_loss(logp, adv, mask)
    assert loss.item() == pytest.approx(-(-1.0 + 2.0 - 1.0) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / 3)  # no ratio, no clipping


def test_a2c_single_pass_updates_once_per_minibatch(rl_ctx):
    torch.manual_seed(0)
    algo = A2C(A2CConfig(num_minibatches=2, lr=1e-3))
    algo.setup(rl_ctx)
    steps = []
    orig = algo.policy.step
    algo.policy.step = lambda: steps.append(1) or orig()
    before = torch.cat([p.detach().flatten().clone() for p in rl_ctx.policy.model.parameters()])
    m = algo.step(["copy a b c =", "sort c b a =", "reverse a b c =", "count a in a a ="]).metrics
    assert len(steps) == 2  # one pass over the rollout: each sample used once
    after = torch.cat([p.detach().flatten() for p in rl_ctx.policy.model.parameters()])
    assert not torch.equal(before, after)
    assert {"loss/policy", "loss/value", "rollout/kl", "reward/proxy"} <= set(m)


def test_a2c_does_not_inherit_from_ppo():
    assert not issubclass(A2C, PPO) and PPO not in A2C.__mro__
