import pytest
import torch

from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader


@pytest.mark.parametrize("arch,cls", [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM")])
def test_tiny_models_save_and_load_with_from_pretrained(arch, cls, synthetic, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader = HFPolicyLoader(HFPolicyConfig(model=arch, hidden_size=32, n_head=2))
    policy = loader.build(synthetic)
    assert type(policy.model).__name__ == cls
    policy.save(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("reverse a b c =", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "reverse a b c ="
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, policy.model(torch.tensor([ids])).logits)
    # and through the plugin, by local path, as a user would point policy.model at it
    again = HFPolicyLoader(HFPolicyConfig(model=str(tmp_path))).build(synthetic)
    assert type(again.model).__name__ == cls


def test_dtype_is_honoured(synthetic, tmp_path):
    policy = HFPolicyLoader(HFPolicyConfig(hidden_size=32, n_head=2)).build(synthetic)
    policy.save(str(tmp_path))
    bf16 = HFPolicyLoader(HFPolicyConfig(model=str(tmp_path), dtype="bfloat16")).load(str(tmp_path))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="policy.dtype"):
        HFPolicyLoader(HFPolicyConfig(dtype="float8"))
    with pytest.raises(CheckpointError, match="No model directory"):
        HFPolicyLoader(HFPolicyConfig()).load(str(tmp_path / "missing"))
    assert HFPolicyConfig().trust_remote_code is False


def test_tiny_model_needs_a_vocabulary():
    class NoVocab:
        def vocabulary(self):
            return None

    with pytest.raises(ConfigError, match="vocabulary"):
        HFPolicyLoader(HFPolicyConfig()).build(NoVocab())


def test_a_vocabulary_holding_the_special_tokens_has_each_once():
    """Data words spelled like the special tokens used to enter the vocabulary a second time:
    ids past the embedding (IndexError) for <eos>, <pad> and <unk> in the text."""
    class Words:
        def vocabulary(self):
            return ["<eos>", "<pad>", "<unk>", "a", "b"]

    policy = HFPolicyLoader(HFPolicyConfig(hidden_size=32, n_head=2)).build(Words())
    tok = policy.tokenizer
    assert len(tok) == policy.model.config.vocab_size == 5
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a <eos> b <pad> <unk>", add_special_tokens=False)["input_ids"]
    assert ids == [3, 1, 4, 0, 2]
    policy.model(torch.tensor([ids]))
