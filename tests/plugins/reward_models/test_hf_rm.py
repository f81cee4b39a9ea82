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



def test_a_logprob_last_critic_starts_from_each_tokens_own_score(policy_dir, tiny_policy):
    """reward_head=logprob_last: the reward pools the linear part's differences (the last
    state relative to the one before the response); the critic's per-token values are each
    token's own w . h_t + b + c log p, minus the bias, times the gain."""
    from rlhfkit.plugins.reward_heads.logprob import LogProbConfig, LogProbHead
    from rlhfkit.rlhf.retokenize import score

    torch.manual_seed(0)
    rm = HFRewardLoader(HFRewardConfig()).build(policy_dir, lambda h: LogProbHead(h, LogProbConfig(init_std=0.1, linear="last")))
    with torch.no_grad():
        rm.head.linear.bias.fill_(0.5)
    rm.set_bias(2.0)
    rm.set_scale(3.0)
    e = encode_pairs(tiny_policy.tokenizer, ["copy a b =", "sort b a c ="], ["a b", "a"], torch.device("cpu"))
    with torch.no_grad():
        hidden = rm.backbone(input_ids=e.input_ids, attention_mask=e.attention_mask).last_hidden_state
        values = rm(e.input_ids, e.attention_mask, per_token=True)
        torch.testing.assert_close(values, (rm.head.value_scores(hidden, e.input_ids) - 2.0) * 3.0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rm.token_values(e.input_ids, e.attention_mask), rm.head.value_scores(hidden, e.input_ids),
                                   rtol=1e-4, atol=1e-4)
        reward = score(rm, e.input_ids, e.attention_mask, e.loss_mask)
        torch.testing.assert_close(reward, (rm.head.pool(rm.head.token_scores(hidden, e.input_ids), e.loss_mask) - 2.0) * 3.0,
                                   rtol=1e-4, atol=1e-4)
        assert not torch.allclose(reward, (rm.head.pool(values / 3.0 + 2.0, e.loss_mask) - 2.0) * 3.0)  # not the values


def sft_logprob_sum(policy_dir, e):
    """Sum over each row's response tokens (EOS included) of log pi_SFT(token | before)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        logits = lm(input_ids=e.input_ids, attention_mask=e.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, e.input_ids[:, 1:, None]).squeeze(-1)
    return (lp * e.loss_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])  # tied and untied LM heads
def test_logprob_head_starts_as_the_sft_models_log_likelihood(arch, synthetic, tmp_path):
    """reward_head=logprob: a fresh RM scores a response by the SFT model's log-probability of
    it (summed over the response's tokens); the copy of the LM head survives a save/load."""
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader
    from rlhfkit.plugins.reward_heads.logprob import LogProbConfig, LogProbHead
    from rlhfkit.rlhf.retokenize import score

    torch.manual_seed(0)
    policy = HFPolicyLoader(HFPolicyConfig(model=arch)).build(synthetic)
    policy_dir = str(tmp_path / "sft")
    policy.save(policy_dir)
    build = lambda h: LogProbHead(h, LogProbConfig())  # noqa: E731
    loader = HFRewardLoader(HFRewardConfig())
    rm = loader.build(policy_dir, build).eval()
    e = encode_pairs(policy.tokenizer, ["copy a b =", "sort b a c ="], ["a b", "a"], torch.device("cpu"))
    expected = sft_logprob_sum(policy_dir, e)
    with torch.no_grad():
        torch.testing.assert_close(score(rm, e.input_ids, e.attention_mask, e.loss_mask), expected, rtol=1e-4, atol=1e-4)
        whole = rm(e.input_ids, e.attention_mask)  # no response mask: every token but the first
        assert (whole < expected - 1e-3).all()  # the prompt's tokens add log-probabilities < 0
    path = str(tmp_path / "rm")
    os.makedirs(path)
    rm.save(path)
    loaded = loader.load(path, build).eval()
    with torch.no_grad():
        torch.testing.assert_close(score(loaded, e.input_ids, e.attention_mask, e.loss_mask), expected, rtol=1e-4, atol=1e-4)
    # the pooling is saved with it: another one would silently change the reward, bias and gain
    with pytest.raises(CheckpointError, match=r"trained with reward_head.pool=sum.*Set reward_head.pool=sum"):
        loader.load(path, lambda h: LogProbHead(h, LogProbConfig(pool="mean")))
    # so is where its linear part reads: the same weights mean another reward
    with pytest.raises(CheckpointError, match=r"trained with reward_head.linear=tokens.*Set reward_head.linear=tokens"):
        loader.load(path, lambda h: LogProbHead(h, LogProbConfig(linear="last")))
    meta_path = os.path.join(path, "reward_model.json")
    meta = json.load(open(meta_path))
    del meta["head_linear"]  # saved before the setting existed: every such head read every token
    json.dump(meta, open(meta_path, "w"))
    loader.load(path, build)
    with pytest.raises(CheckpointError, match=r"trained with reward_head.linear=tokens"):
        loader.load(path, lambda h: LogProbHead(h, LogProbConfig(linear="last")))


def test_scale_multiplies_rewards_and_values_and_is_saved(policy_dir, tiny_policy, tmp_path):
    loader = HFRewardLoader(HFRewardConfig())
    rm = loader.build(policy_dir, head_builder)
    rm.set_bias(0.5)
    e = encode_pairs(tiny_policy.tokenizer, ["copy a ="], ["a"], torch.device("cpu"))
    with torch.no_grad():
        r1, v1 = rm(e.input_ids, e.attention_mask), rm(e.input_ids, e.attention_mask, per_token=True)
        rm.set_scale(3.0)
        torch.testing.assert_close(rm(e.input_ids, e.attention_mask), 3.0 * r1)
        torch.testing.assert_close(rm(e.input_ids, e.attention_mask, per_token=True), 3.0 * v1)
    path = str(tmp_path / "rm")
    os.makedirs(path)
    rm.save(path)
    assert json.load(open(os.path.join(path, "reward_model.json")))["gain"] == 3.0
    assert loader.load(path, head_builder).gain == 3.0
    meta = json.load(open(os.path.join(path, "reward_model.json")))
    del meta["gain"]  # a reward model saved before rm.scale: unscaled
    json.dump(meta, open(os.path.join(path, "reward_model.json"), "w"))
    assert loader.load(path, head_builder).gain == 1.0


@pytest.mark.parametrize("layout", ["one file", "sharded", "hub cache"])
def test_an_untied_lm_head_is_read_alone_not_with_the_whole_model(layout, synthetic, tmp_path, monkeypatch):
    """reward_head=logprob on an untied LM head (Llama) reads that one tensor from the
    safetensors shard that holds it, equal to the loaded model's head; the causal LM itself
    is never loaded, in one file, sharded, or from a local hub cache."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader
    from rlhfkit.plugins.reward_models import hf_rm

    from ...helpers import save_to_hf_cache

    torch.manual_seed(0)
    policy = HFPolicyLoader(HFPolicyConfig(model="tiny-llama")).build(synthetic)
    path = str(tmp_path / "sft")
    policy.model.save_pretrained(path, max_shard_size="20KB" if layout == "sharded" else "5GB")
    policy.tokenizer.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) == (layout == "sharded")
    expected = AutoModelForCausalLM.from_pretrained(path).get_output_embeddings().weight.detach()
    backbone = AutoModelForCausalLM.from_pretrained(path).model
    if layout == "hub cache":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # HF_HOME=<tmp_path>
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        save_to_hf_cache(path, str(tmp_path / "hub"), "org/tiny-llama")
        path = "org/tiny-llama"
    assert not backbone.config.tie_word_embeddings

    def whole_model(*args, **kwargs):
        raise AssertionError("the whole causal LM was loaded for its head")

    monkeypatch.setattr(hf_rm, "load_model", whole_model)
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        weight = hf_rm.lm_head_weight(backbone, path, dtype, trust_remote_code=False)
        assert weight.dtype == torch_dtype
        torch.testing.assert_close(weight, expected.to(torch_dtype))
