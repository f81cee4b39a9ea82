"""Memory of the RL stage's models with and without LoRA, as rlhfkit builds them.

Builds the policy, the reference, the reward model and the critic through the real
plugins (``policy=hf``, ``reward_model=hf_rm``) from a GPT-2 checkpoint saved to disk, and
counts the bytes of distinct parameter tensors (shared storage counted once) and of the
Adam states the trainable parameters will need (two fp32 tensors each).

    python benchmarks/lora_memory.py                  # GPT-2 small config (124M), random weights
    python benchmarks/lora_memory.py --model /models/Qwen2.5-0.5B --json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def measure(model_path: str, lora: bool, r: int) -> dict:
    import torch

    from rlhfkit.plugins.hf_common import LoraSettings
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader
    from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead
    from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader

    settings = LoraSettings(enabled=lora, r=r)
    loader = HFPolicyLoader(HFPolicyConfig(model=model_path, lora=settings))
    policy = loader.adapt(loader.load(model_path))
    reference = loader.shared_reference(policy)
    if reference is None:  # a second, frozen copy (the pipeline's prepare_frozen)
        reference = loader.load(model_path)
        reference.model.requires_grad_(False)
    head = lambda h: LastTokenHead(h, LastTokenConfig())  # noqa: E731
    rm_loader = HFRewardLoader(HFRewardConfig(lora=settings))
    rm = HFRewardLoader(HFRewardConfig()).build(model_path, head)  # frozen in RL: no adapter
    rm.requires_grad_(False)
    critic = rm_loader.build(model_path, head)
    seen, resident, trainable = set(), 0, 0
    for module in (policy.model, reference.model, rm, critic):
        for p in module.parameters():
            key = (p.untyped_storage().data_ptr(), p.dtype)
            if key not in seen:
                seen.add(key)
                resident += p.numel() * p.element_size()
            if p.requires_grad:
                trainable += p.numel()
    return {"lora": lora, "parameter_MB": resident / 2**20, "trainable_params": trainable,
            "adam_state_MB": trainable * 8 / 2**20, "reference_MB": sum(p.numel() * p.element_size() for p in reference.model.parameters()) / 2**20,
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a causal LM directory (default: GPT-2 small built from config)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from tokenizers import Tokenizer, models
            from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

            path = os.path.join(tmp, "gpt2-small")
            GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1}, unk_token="<unk>")),
                                          eos_token="<eos>", unk_token="<unk>")
            tok.save_pretrained(path)
        rows = [measure(path, lora, args.r) for lora in (False, True)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'run':<6}{'parameters MB':>15}{'reference MB':>14}{'trainable':>14}{'Adam state MB':>15}")
    for row in rows:
        print(f"{'LoRA' if row['lora'] else 'full':<6}{row['parameter_MB']:>15.0f}{row['reference_MB']:>14.0f}"
              f"{row['trainable_params']:>14,}{row['adam_state_MB']:>15.0f}")


if __name__ == "__main__":
    main()
