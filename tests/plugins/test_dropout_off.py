"""Dropout is off in every model RL loads, including architectures whose attention or
residual dropout is a probability read from the config rather than an ``nn.Dropout``
module (OPT, Llama/Qwen2, GPT-NeoX): RL needs identical forward passes ("N+ details")."""

import pytest
import torch

from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader, word_level_tokenizer
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
from rlhfkit.plugins.reward_models.seq_cls import SeqClsConfig, SeqClsLoader
from rlhfkit.rlhf.dropout import disable_dropout

from ..conftest import head_builder

WORDS = "a b c d e f g h copy sort reverse =".split()


def _config(arch: str, vocab_size: int):
    from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig

    size = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    if arch == "opt":  # real OPT checkpoints ship with dropout 0.1
        return OPTConfig(ffn_dim=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, **size)
    if arch == "llama":
        return LlamaConfig(intermediate_size=64, num_key_value_heads=2, attention_dropout=0.1, **size)
    return GPTNeoXConfig(intermediate_size=64, attention_dropout=0.1, hidden_dropout=0.1, classifier_dropout=0.1, **size)


@pytest.fixture(params=["opt", "llama", "gpt_neox"])
def checkpoint(request, tmp_path):
    """A tiny causal LM of that architecture with dropout 0.1, saved with a tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = word_level_tokenizer(WORDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param, len(tok)))
    path = str(tmp_path / request.param)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def _twice(model, tok, **kw):
    """Two train-mode forward passes on the same input."""
    e = tok(["copy a b c = a b c", "sort c b a ="], padding=True, return_tensors="pt")
    model.train()
    with torch.no_grad():
        outs = [model(input_ids=e.input_ids, attention_mask=e.attention_mask, **kw) for _ in range(2)]
    return [o.logits if hasattr(o, "logits") else o for o in outs]


def _dropout_fields(config):
    return {k: v for k, v in vars(config).items() if "dropout" in k and isinstance(v, float)}


def test_the_rl_policy_and_reference_load_without_dropout(checkpoint):
    path, tok = checkpoint
    policy = HFPolicyLoader(HFPolicyConfig(model=path)).load(path)
    disable_dropout(policy.model)  # as the algorithms do: nn.Dropout modules alone are not enough
    first, second = _twice(policy.model, tok)
    assert torch.equal(first, second), f"max |difference| {(first - second).abs().max():.3f}"
    assert _dropout_fields(policy.model.config) and not any(_dropout_fields(policy.model.config).values())


def test_reward_models_and_critics_load_without_dropout(checkpoint):
    path, tok = checkpoint
    rm = HFRewardLoader(HFRewardConfig()).build(path, head_builder)  # the backbone loader the critic uses too
    first, second = _twice(rm, tok)
    assert torch.equal(first, second), f"max |difference| {(first - second).abs().max():.3f}"
    classifier = SeqClsLoader(SeqClsConfig()).build(path, head_builder)
    first, second = _twice(classifier, tok, per_token=True)
    assert torch.equal(first, second), f"max |difference| {(first - second).abs().max():.3f}"


def test_sft_keeps_the_checkpoints_dropout(checkpoint):
    """SFT trains the pretrained model as it ships: dropout is a regulariser there."""
    path, _ = checkpoint
    model = HFPolicyLoader(HFPolicyConfig(model=path)).build(None).model
    assert _dropout_fields(model.config) and all(v == 0.1 for k, v in _dropout_fields(model.config).items() if k != "classifier_dropout")
