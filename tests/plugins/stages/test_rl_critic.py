"""Where the value model starts: the rl stage's ``make_critic`` and the critic settings of
PPO and A2C (``algorithm.critic_init``)."""

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.plugins.algorithms.a2c import A2C, A2CConfig
from rlhfkit.plugins.algorithms.ppo import PPO, PPOConfig
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
from rlhfkit.plugins.stages.rl import RL, RLConfig

from ...conftest import head_builder


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def stage_ctx(policy_dir, tmp_path):
    """A reward model whose weights differ from the SFT policy's, and what the stage needs
    to build a critic from either."""
    loader = HFRewardLoader(HFRewardConfig())
    rm = loader.build(policy_dir, head_builder)
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(0.5)
    rm.set_bias(-3.0)
    rm.save(str(tmp_path / "rm"))
    ctx = SimpleNamespace(components={"reward_model": loader, "reward_head": head_builder},
                          products={"sft": policy_dir})
    return ctx, str(tmp_path / "rm"), loader.build(policy_dir, head_builder)


def test_make_critic_copies_the_reward_model_or_puts_a_fresh_head_on_sft(stage_ctx):
    ctx, rm_path, fresh = stage_ctx
    make_critic = RL(RLConfig()).critic_factory(ctx, rm_path)
    from_rm, from_sft = make_critic(), make_critic(from_reward_model=False)
    assert float(from_rm.bias) == -3.0 and float(from_sft.bias) == 0.0
    assert not torch.equal(_params(from_rm.backbone), _params(from_sft.backbone))
    assert torch.equal(_params(from_sft.backbone), _params(fresh.backbone))  # the SFT backbone, a new head
    assert all(p.requires_grad for p in from_rm.parameters())
    # a reward source with no model that reads the policy's tokens: SFT either way
    no_rm = RL(RLConfig()).critic_factory(ctx, None)
    assert torch.equal(_params(no_rm().backbone), _params(fresh.backbone))


class Recording:
    def __init__(self, make_critic):
        self.make_critic, self.calls = make_critic, []

    def __call__(self, from_reward_model=True):
        self.calls.append(from_reward_model)
        return self.make_critic()


@pytest.mark.parametrize("algorithm,config,default", [(A2C, A2CConfig, False), (PPO, PPOConfig, True)])
def test_critic_init_setting_reaches_make_critic(rl_ctx, algorithm, config, default):
    """A2C starts its value model on SFT by default, PPO from the reward model
    (InstructGPT); ``critic_init`` picks either."""
    rl_ctx.make_critic = Recording(rl_ctx.make_critic)
    algorithm(config()).setup(rl_ctx)
    algorithm(config(critic_init="reward_model")).setup(rl_ctx)
    algorithm(config(critic_init="sft")).setup(rl_ctx)
    assert rl_ctx.make_critic.calls == [default, True, False]
