import json
import os

import pytest
import torch

from rlhfkit.errors import CheckpointError
from rlhfkit.plugins.reward_heads.mean_pool import MeanPoolConfig, MeanPoolHead
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
from rlhfkit.rlhf.tokenize import encode_pairs

from ...conftest import head_builder


def test_save_load_round_trip_and_from_pretrained(policy_dir, tiny_policy, tmp_path):
    from transformers import AutoModel

    loader = HFRewardLoader(HFRewardConfig())
    rm = loader.build(policy_dir, head_builder)
    rm.set_bias(0.25)
    e = encode_pairs(tiny_policy.tokenizer, ["copy a b =", "sort b a ="], ["a b", "a"], torch.device("cpu"))
    with torch.no_grad():
        before = rm(e.input_ids, e.attention_mask)
    path = str(tmp_path / "rm")
    os.makedirs(path)
    rm.save(path)
    loaded = loader.load(path, head_builder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(e.input_ids, e.attention_mask), before)
    assert json.load(open(os.path.join(path, "reward_model.json")))["bias"] == 0.25
    AutoModel.from_pretrained(path)  # the backbone is an ordinary HF directory


def test_bias_shifts_rewards(policy_dir, tiny_policy):
    rm = HFRewardLoader(HFRewardConfig()).build(policy_dir, head_builder)
    e = encode_pairs(tiny_policy.tokenizer, ["copy a ="], ["a"], torch.device("cpu"))
    with torch.no_grad():
        r0 = rm(e.input_ids, e.attention_mask)
        rm.set_bias(1.5)
        torch.testing.assert_close(rm(e.input_ids, e.attention_mask), r0 - 1.5)
        per_token = rm(e.input_ids, e.attention_mask, per_token=True)
    assert per_token.shape == e.input_ids.shape


def test_wrong_head_and_missing_checkpoint_are_clear_errors(policy_dir, tmp_path):
    loader = HFRewardLoader(HFRewardConfig())
    rm = loader.build(policy_dir, head_builder)
    path = str(tmp_path / "rm")
    os.makedirs(path)
    rm.save(path)
    with pytest.raises(CheckpointError, match="trained with head LastTokenHead"):
        loader.load(path, lambda h: MeanPoolHead(h, MeanPoolConfig()))
    with pytest.raises(CheckpointError, match="not a reward-model checkpoint"):
        loader.load(policy_dir, head_builder)


@pytest.mark.parametrize("pooled", ["last_token", "mean_pool"])
def test_critic_values_are_shifted_by_the_bias_like_the_reward(policy_dir, tiny_policy, pooled):
    """A critic initialised from the RM starts on the rewards' scale: its per-token values
    are the token scores minus the normalising bias, as in the N+ reference. Pooled as the
    reward is (the last token's value, or the mean), they give the reward."""
    build = head_builder if pooled == "last_token" else (lambda h: MeanPoolHead(h, MeanPoolConfig()))
    rm = HFRewardLoader(HFRewardConfig()).build(policy_dir, build)
    rm.set_bias(2.0)
    e = encode_pairs(tiny_policy.tokenizer, ["copy a b =", "sort b a c ="], ["a b", "a"], torch.device("cpu"))
    with torch.no_grad():
        reward = rm(e.input_ids, e.attention_mask)
        values = rm(e.input_ids, e.attention_mask, per_token=True)  # (B, T)
        torch.testing.assert_close(values, rm.token_values(e.input_ids, e.attention_mask) - 2.0)
    torch.testing.assert_close(rm.head.pool(values, e.attention_mask), reward)

