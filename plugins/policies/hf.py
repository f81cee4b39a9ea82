"""``policy=hf``: any Hugging Face causal LM, or a tiny one built from config.

``policy.model`` is a hub name or a local directory (loaded with ``from_pretrained``), or
``tiny-gpt2`` / ``tiny-llama``: a small model built from config with a word-level tokenizer
made from the dataset's vocabulary. Either way checkpoints are ordinary Hugging Face
directories (safetensors) that ``from_pretrained`` loads; with ``policy.lora.enabled=true``
training goes through a LoRA adapter (``policy.lora.quantize=4bit``: QLoRA), saved merged
or alone (``policy.lora.save=merged|adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Dataset
from rlhfkit.plugins.hf_common import (
    DTYPES, AdapterDisabled, LoraSettings, apply_lora, check_settings, is_peft, load_model, load_tokenizer,
    quantization_config, save_with_tokenizer,
)
from rlhfkit.settings import bounded, one_of

TINY = ("tiny-gpt2", "tiny-llama")
SPECIAL = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}


@dataclass
class HFPolicyConfig:
    model: str = "tiny-gpt2"
    """tiny-gpt2 / tiny-llama (built from config), or a hub name or local path."""
    dtype: str = one_of(*DTYPES)
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    n_layer: int = bounded(2, ge=1)
    """Tiny models only: transformer blocks."""
    hidden_size: int = bounded(128, ge=1)
    """Tiny models only: width."""
    n_head: int = bounded(4, ge=1)
    """Tiny models only: attention heads."""
    max_positions: int = bounded(64, ge=2)
    """Tiny models only: context length."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA/QLoRA for SFT and RL (``policy.lora.enabled=true``). In RL the reference policy
    is this model with the adapter disabled: no second copy of the weights."""


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def word_level_tokenizer(vocabulary: list[str]) -> Any:
    """A whitespace word-level tokenizer: every vocabulary symbol is one token. The special
    tokens come first, once each: a data word spelled like one (``<eos>``) is that token,
    and the files plugin makes a record holding one bad data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["pad"], SPECIAL["eos"], SPECIAL["unk"]]
    words = [w for w in vocabulary if w not in specials]
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL["pad"], eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"]
    )


class HFPolicy:
    """``base``: where the weights under any adapter come from (a path or hub name; None
    for a model built from config), so that an adapter-only save can name it."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lora: LoraSettings | None = None, base: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.lora, self.base = lora or LoraSettings(), base

    def save(self, path: str) -> None:
        save_with_tokenizer(self.model, self.tokenizer, path, self.lora, self.base)


class HFPolicyLoader:
    def __init__(self, cfg: HFPolicyConfig):
        check_settings("policy", cfg.dtype, cfg.lora)
        self.cfg = cfg
        quiet_transformers()

    def _tiny(self, vocabulary: list[str]) -> HFPolicy:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        cfg = self.cfg
        tok = word_level_tokenizer(vocabulary)
        ids = dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if cfg.model == "tiny-gpt2":
            config = GPT2Config(
                n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
            )
            model = GPT2LMHeadModel(config)
        else:
            config = LlamaConfig(
                hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.max_positions,
                **ids,
            )
            model = LlamaForCausalLM(config)
        return HFPolicy(model.to(DTYPES[cfg.dtype]), tok, cfg.lora, base=None)

    def build(self, dataset: Dataset) -> HFPolicy:
        """The policy SFT trains: a tiny model built from config, or a pretrained causal LM
        by hub name or path (QLoRA: its base quantized); with LoRA, a fresh adapter on it."""
        if self.cfg.model in TINY:
            vocabulary = dataset.vocabulary()
            if not vocabulary:
                raise ConfigError(
                    f"policy.model={self.cfg.model} builds its tokenizer from the dataset's vocabulary, and "
                    f"this dataset has none. Point policy.model at a pretrained model (hub name or path)."
                )
            policy = self._tiny(vocabulary)
        else:
            # SFT trains the pretrained model with the dropout it ships with
            policy = self.load(self.cfg.model, quantization_config(self.cfg.lora, DTYPES[self.cfg.dtype]), dropout=True)
        return self.adapt(policy)

    def load(self, path: str, quantization: Any = None, dropout: bool = False) -> HFPolicy:
        """A causal LM and its tokenizer from a hub name or a directory (an adapter-only
        directory comes back with its adapter merged into its base), with dropout off
        (RL's policy and reference) unless ``dropout``."""
        model = load_model(path, "AutoModelForCausalLM", self.cfg.dtype, self.cfg.trust_remote_code, quantization, dropout)
        return HFPolicy(model, load_tokenizer(path, self.cfg.trust_remote_code), self.cfg.lora, base=path)

    def adapt(self, policy: HFPolicy) -> HFPolicy:
        """Make a loaded policy trainable the configured way: a fresh LoRA adapter when
        ``policy.lora.enabled`` (the pipeline calls this for the RL policy)."""
        if self.cfg.lora.enabled and not is_peft(policy.model):
            policy.model = apply_lora(policy.model, self.cfg.lora, "CAUSAL_LM")
        return policy

    def shared_reference(self, policy: HFPolicy) -> HFPolicy | None:
        """Under LoRA, the frozen reference is the policy with its adapter disabled."""
        if not is_peft(policy.model):
            return None
        return HFPolicy(AdapterDisabled(policy.model), policy.tokenizer, policy.lora, policy.base)


@hookimpl
def rlhfkit_register_policies(register):
    register("hf", HFPolicyLoader, HFPolicyConfig)
