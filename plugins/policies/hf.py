"""``policy=hf``: any Hugging Face causal LM, or a tiny one built from config.

``policy.model`` is a hub name or a local directory (loaded with ``from_pretrained``), or
``tiny-gpt2`` / ``tiny-llama``: a small model built from config with a word-level tokenizer
made from the dataset's vocabulary. Either way checkpoints are ordinary Hugging Face
directories (safetensors) that ``from_pretrained`` loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import Dataset

TINY = ("tiny-gpt2", "tiny-llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}


@dataclass
class HFPolicyConfig:
    model: str = "tiny-gpt2"
    """tiny-gpt2 / tiny-llama (built from config), or a hub name or local path."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    n_layer: int = 2
    """Tiny models only: transformer blocks."""
    hidden_size: int = 128
    """Tiny models only: width."""
    n_head: int = 4
    """Tiny models only: attention heads."""
    max_positions: int = 64
    """Tiny models only: context length."""


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def word_level_tokenizer(vocabulary: list[str]) -> Any:
    """A whitespace word-level tokenizer: every vocabulary symbol is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([SPECIAL["pad"], SPECIAL["eos"], SPECIAL["unk"], *vocabulary])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL["pad"], eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"]
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs identical forward passes for sampling and scoring ("N+ details" #3)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class HFPolicy:
    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def save(self, path: str) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)


class HFPolicyLoader:
    def __init__(self, cfg: HFPolicyConfig):
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"policy.dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}.")
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
        return HFPolicy(model.to(DTYPES[cfg.dtype]), tok)

    def build(self, dataset: Dataset) -> HFPolicy:
        if self.cfg.model in TINY:
            vocabulary = dataset.vocabulary()
            if not vocabulary:
                raise ConfigError(
                    f"policy.model={self.cfg.model} builds its tokenizer from the dataset's vocabulary, and "
                    f"this dataset has none. Point policy.model at a pretrained model (hub name or path)."
                )
            return self._tiny(vocabulary)
        return self.load(self.cfg.model)

    def load(self, path: str) -> HFPolicy:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        looks_local = os.path.sep in path or path.startswith(".") or os.path.isdir(path)
        if looks_local and not os.path.isdir(path):
            raise CheckpointError(f"No model directory at {path!r}. Check the path, or use a hub name.")
        kw = dict(trust_remote_code=self.cfg.trust_remote_code)
        try:
            tok = AutoTokenizer.from_pretrained(path, **kw)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.cfg.dtype], **kw)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"Could not load a causal LM from {path!r}: {exc}") from exc
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return HFPolicy(model, tok)


@hookimpl
def rlhfkit_register_policies(register):
    register("hf", HFPolicyLoader, HFPolicyConfig)
