import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.algorithms.rloo import RLOO, RLOOConfig, leave_one_out_advantages


def test_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = leave_one_out_advantages(r, k=3)
    torch.testing.assert_close(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0]))
    assert adv.view(-1, 3).sum(-1).abs().max() < 1e-6  # zero-mean per prompt


def test_rloo_is_critic_free_and_updates_the_policy(rl_ctx):
    rl_ctx.make_critic = lambda: pytest.fail("RLOO asked for a critic")
    algo = RLOO(RLOOConfig(rloo_k=2, lr=1e-3))
    algo.setup(rl_ctx)
    before = torch.cat([p.detach().flatten().clone() for p in rl_ctx.policy.model.parameters()])
    torch.manual_seed(0)
    m = algo.step(["copy a b c =", "sort c b a =", "reverse a b =", "count a in a a ="]).metrics
    after = torch.cat([p.detach().flatten() for p in rl_ctx.policy.model.parameters()])
    assert not torch.equal(before, after)
    assert m["rollout/kl"] == pytest.approx(0.0, abs=1e-4)  # first step: policy == reference
    assert {"loss/policy", "reward/proxy", "rloo/advantage_std"} <= set(m)


def test_rloo_needs_k_of_at_least_two():
    with pytest.raises(ConfigError, match="rloo_k"):
        RLOO(RLOOConfig(rloo_k=1))


def test_rloo_takes_four_optimizer_steps_per_rollout_by_default(rl_ctx, monkeypatch):
    """The default (4, as A2C's and GRPO's): with one step per rollout RLOO did not raise gold
    on the words suite (docs/overoptimisation.md section 7)."""
    cfg = RLOOConfig(rloo_k=2, lr=1e-3)
    assert cfg.num_minibatches == 4
    steps, real = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **kw: steps.append(1) or real(self, *a, **kw))
    algo = RLOO(cfg)
    algo.setup(rl_ctx)
    torch.manual_seed(0)
    algo.step(["copy a b c =", "sort c b a =", "reverse a b =", "count a in a a ="])
    assert len(steps) == 4  # one per minibatch of whole groups (here one prompt's k=2 responses each)
