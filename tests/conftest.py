import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhfkit.interfaces import RLContext, RolloutConfig  # noqa: E402
from rlhfkit.plugins.backends.single import SingleConfig, SingleDevice  # noqa: E402
from rlhfkit.plugins.datasets.synthetic import SyntheticConfig, SyntheticTasks  # noqa: E402
from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader  # noqa: E402
from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead  # noqa: E402
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader  # noqa: E402


@pytest.fixture
def synthetic():
    return SyntheticTasks(SyntheticConfig(num_demonstrations=64, num_rm_prompts=8, num_rm_test_prompts=4, num_rl_prompts=32, num_test_prompts=32))


@pytest.fixture
def policy_loader():
    return HFPolicyLoader(HFPolicyConfig(hidden_size=32, n_layer=2, n_head=2))


@pytest.fixture
def tiny_policy(policy_loader, synthetic):
    torch.manual_seed(0)
    return policy_loader.build(synthetic)


@pytest.fixture
def policy_dir(tiny_policy, tmp_path):
    path = str(tmp_path / "sft")
    tiny_policy.save(path)
    return path


@pytest.fixture
def backend():
    return SingleDevice(SingleConfig(device="cpu"))


def head_builder(hidden):
    return LastTokenHead(hidden, LastTokenConfig(init_std=0.5))


@pytest.fixture
def rl_ctx(policy_loader, policy_dir, backend, synthetic):
    """A real RL context on tiny models: policy and reference are the same SFT weights."""
    import copy

    torch.manual_seed(0)
    policy = policy_loader.load(policy_dir)
    reference = policy_loader.load(policy_dir)
    backend.prepare_frozen(reference.model)
    rm = HFRewardLoader(HFRewardConfig()).build(policy_dir, head_builder)
    backend.prepare_frozen(rm)

    def make_critic(from_reward_model=True):
        c = copy.deepcopy(rm)
        c.requires_grad_(True)
        return c

    return RLContext(
        policy=policy, reference=reference, reward=RewardOf(rm), backend=backend, rollout=RolloutConfig(max_new_tokens=8),
        make_critic=make_critic, demonstrations=lambda: synthetic.sft_examples("train")[:8],
    )


class RewardOf:
    """A reward source scoring with a reward-model module (what ``reward=model`` does
    after loading the ``rm`` product)."""

    needs = ()

    def __init__(self, rm):
        self.rm, self.critic_init = rm, None

    def setup(self, ctx, tokenizer):
        pass

    def __call__(self, rollout):
        return self.rm(rollout.input_ids, rollout.attention_mask)
