"""Pretrained causal LMs by path, dtypes, LoRA with the reference sharing the weights,
merged and adapter-only saves, QLoRA's configuration, trust_remote_code off."""

import json
import os

import pytest
import torch

from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.plugins.hf_common import LoraSettings, is_peft, quantization_config
from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader

from ...helpers import save_tiny_model, save_to_hf_cache

TEXTS = ["reverse a b c = c b a", "hello there, how are you?", "Human: hi Assistant: hello"] * 20


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)), TEXTS)


def _logits(model, text="reverse a b ="):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_loads_any_causal_lm_by_path_in_the_dtype_asked_for(model_dir):
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        p = HFPolicyLoader(HFPolicyConfig(model=model_dir, dtype=dtype)).build(dataset=None)
        assert next(p.model.parameters()).dtype == torch_dtype
        assert p.tokenizer.pad_token_id is not None


def test_a_hub_name_loads_from_the_local_cache_offline(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # HF_HOME=<tmp_path>
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    save_to_hf_cache(model_dir, str(tmp_path / "hub"), "tiny-org/tiny-lm")
    p = HFPolicyLoader(HFPolicyConfig(model="tiny-org/tiny-lm")).build(dataset=None)
    want = HFPolicyLoader(HFPolicyConfig(model=model_dir)).build(dataset=None)
    torch.testing.assert_close(_logits(p.model), _logits(want.model))
    assert p.tokenizer("reverse a b =")["input_ids"] == want.tokenizer("reverse a b =")["input_ids"]
    with pytest.raises(CheckpointError, match=r"'tiny-org/other' is neither a local directory nor a model in the "
                       r"Hugging Face cache \(.*hub\).*hf download tiny-org/other"):
        HFPolicyLoader(HFPolicyConfig(model="tiny-org/other")).build(dataset=None)
    for missing in ("./models/x", str(tmp_path / "x"), "a/b/c"):  # paths, not hub names
        with pytest.raises(CheckpointError, match="No model directory at"):
            HFPolicyLoader(HFPolicyConfig(model=missing)).build(dataset=None)


def test_a_bin_only_model_holding_code_is_a_checkpoint_error(model_dir, tmp_path):
    import shutil

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    model = shutil.copytree(model_dir, str(tmp_path / "bin-only"))
    os.remove(os.path.join(model, "model.safetensors"))
    torch.save({"weight": Exploit()}, os.path.join(model, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"bin-only: its .bin weights hold more than tensors.*GLOBAL posix.system"):
        HFPolicyLoader(HFPolicyConfig(model=model)).build(dataset=None)
    assert not (tmp_path / "pwned").exists()


def test_trust_remote_code_is_off_unless_asked(model_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.append(kw["trust_remote_code"]) or real(path, **kw))
    HFPolicyLoader(HFPolicyConfig(model=model_dir)).build(dataset=None)
    HFPolicyLoader(HFPolicyConfig(model=model_dir, trust_remote_code=True)).build(dataset=None)
    assert seen == [False, True]


def test_lora_reference_is_the_policy_with_its_adapter_disabled(model_dir):
    loader = HFPolicyLoader(HFPolicyConfig(model=model_dir, lora=LoraSettings(enabled=True, r=4)))
    base = loader.load(model_dir).model
    policy = loader.adapt(loader.load(model_dir))
    assert is_peft(policy.model)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    reference = loader.shared_reference(policy)
    assert list(reference.model.parameters()) == []  # no second copy of the weights
    with torch.no_grad():  # train the adapter away from zero
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    assert not torch.allclose(_logits(policy.model), _logits(base), atol=1e-4)
    torch.testing.assert_close(_logits(reference.model), _logits(base))  # the SFT model, exactly
    reference.model.eval().requires_grad_(False)  # freezing the reference leaves the adapter trainable
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(_logits(policy.model), _logits(policy.model))


def test_merged_and_adapter_only_saves_load_back_to_the_same_model(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    for mode in ("merged", "adapter"):
        loader = HFPolicyLoader(HFPolicyConfig(model=model_dir, lora=LoraSettings(enabled=True, r=4, save=mode)))
        policy = loader.build(dataset=None)
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.3)
        want = _logits(policy.model)
        out = str(tmp_path / mode)
        policy.save(out)
        files = set(os.listdir(out))
        if mode == "merged":  # an ordinary checkpoint: from_pretrained alone reads it
            assert "adapter_config.json" not in files and "model.safetensors" in files
            torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), want, atol=1e-5, rtol=1e-4)
        else:  # the adapter alone, naming its base by a relative path
            assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
            base = json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"]
            assert os.path.normpath(os.path.join(out, base)) == os.path.normpath(model_dir)
            from peft import PeftModel

            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
            torch.testing.assert_close(_logits(peft), want, atol=1e-5, rtol=1e-4)
        again = HFPolicyLoader(HFPolicyConfig()).load(out)  # rlhfkit loads either kind
        torch.testing.assert_close(_logits(again.model), want, atol=1e-5, rtol=1e-4)


def test_adapter_save_of_a_model_built_from_config_keeps_its_base(synthetic, tmp_path):
    loader = HFPolicyLoader(HFPolicyConfig(hidden_size=32, n_layer=2, n_head=2, lora=LoraSettings(enabled=True, save="adapter")))
    policy = loader.build(synthetic)
    want = _logits(policy.model)
    policy.save(str(tmp_path / "sft"))
    assert os.path.isfile(tmp_path / "sft" / "base_model" / "model.safetensors")
    torch.testing.assert_close(_logits(HFPolicyLoader(HFPolicyConfig()).load(str(tmp_path / "sft")).model), want)


def test_qlora_config(monkeypatch):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        quantization_config(LoraSettings(enabled=True, quantize="4bit"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    q = quantization_config(LoraSettings(enabled=True, quantize="4bit"), torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(LoraSettings(enabled=True, quantize="8bit"), torch.float32).load_in_8bit
    assert quantization_config(LoraSettings(), torch.float32) is None
    with pytest.raises(ConfigError, match="enabled=true"):
        HFPolicyLoader(HFPolicyConfig(lora=LoraSettings(quantize="4bit")))
    with pytest.raises(ConfigError, match=r"^policy.lora.save=both: must be one of merged, adapter$"):
        HFPolicyLoader(HFPolicyConfig(lora=LoraSettings(enabled=True, save="both")))


def test_the_lora_memory_benchmark_counts_a_shared_reference_as_free(model_dir):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    spec = importlib.util.spec_from_file_location("lora_memory", os.path.join(root, "benchmarks", "lora_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full, lora = bench.measure(model_dir, False, 4), bench.measure(model_dir, True, 4)
    assert lora["reference_MB"] == 0 < full["reference_MB"]
    assert lora["trainable_params"] < full["trainable_params"] / 5
    assert lora["parameter_MB"] < full["parameter_MB"]
