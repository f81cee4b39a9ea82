"""``reward_model=hf_rm``: a Hugging Face backbone (``AutoModel``) with a reward head.

InstructGPT initialises the reward model from the SFT model; ``build`` does that from the
SFT checkpoint, or from ``reward_model.model`` (another base, with its own tokenizer: the
pipeline re-tokenizes the policy's text for it). ``reward_model.lora.enabled=true`` trains
the backbone through LoRA (QLoRA with ``lora.quantize``). Saved as a Hugging Face directory (the backbone, loadable with
``AutoModel.from_pretrained``) plus ``reward_head.safetensors`` and ``reward_model.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from rlhfkit import hookimpl
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import HeadBuilder
from rlhfkit.plugins.hf_common import (
    DTYPES, LoraSettings, apply_lora, check_settings, has_tokenizer, is_adapter_dir, is_peft, load_model, load_tokenizer,
    quantization_config, save_with_tokenizer,
)
from rlhfkit.plugins.policies.hf import quiet_transformers
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.tokenize import positions
from rlhfkit.settings import one_of

HEAD_FILE, META_FILE = "reward_head.safetensors", "reward_model.json"


@dataclass
class HFRewardConfig:
    model: Optional[str] = None
    """Backbone of the reward model (and of PPO's critic): a hub name or path. Default: the
    SFT checkpoint. A model with another tokenizer scores the policy's text re-tokenized."""
    dtype: str = one_of(*DTYPES)
    """Backbone dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA/QLoRA on the backbone for RM training and for the critic (the head is trained
    in full)."""


def reads_tokens(head: torch.nn.Module) -> bool:
    """A head that scores tokens from the ids too, and pools over the response alone
    (``reward_head=logprob``)."""
    return bool(getattr(head, "reads_tokens", False))


def pool_mask(head: torch.nn.Module, attention_mask: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
    """What ``head.pool`` averages over: the attention mask; for a head that reads tokens, the
    response's positions, or, when the caller does not know them, every attended position
    but the first."""
    if not reads_tokens(head):
        return attention_mask
    if response_mask is not None:
        return response_mask
    first = attention_mask.long().cumsum(-1) == 1
    return attention_mask * ~first


def lm_head_weight(backbone: torch.nn.Module, path: str, dtype: str, trust_remote_code: bool) -> torch.Tensor:
    """The (vocab, hidden) weight of the language-model head of the causal LM at ``path``,
    whose backbone is ``backbone``: its input embeddings when tied, else read from ``path``."""
    if getattr(backbone.config, "tie_word_embeddings", False):
        return backbone.get_input_embeddings().weight
    weight = read_lm_head(path, dtype, trust_remote_code)
    if weight is not None:
        return weight
    head = load_model(path, "AutoModelForCausalLM", dtype, trust_remote_code).get_output_embeddings()
    if head is None:
        raise ConfigError(f"{path!r} has no language-model head; reward_head=logprob needs a causal LM checkpoint "
                          "(the SFT one). Select another reward_head, and for an ensemble rm.member_heads "
                          "without logprob heads (rm.member_heads=[last_token,mlp]).")
    return head.weight


def read_lm_head(path: str, dtype: str, trust_remote_code: bool) -> torch.Tensor | None:
    """The LM head's weight read alone from the safetensors file that holds it (one shard of
    a sharded checkpoint), not the whole causal LM: the head is vocab x hidden, the model
    is all of it. Its name comes from the architecture built on the meta device. None where
    that does not apply (an adapter directory, weights not in safetensors, a name the
    checkpoint does not use, no LM head): the caller then loads the model."""
    import transformers
    from safetensors import safe_open
    from transformers.utils import cached_file

    if os.path.isdir(path) and is_adapter_dir(path):
        return None  # the head is the base's with the adapter merged in
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            lm = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        head = lm.get_output_embeddings()
        name = next((n for n, p in lm.named_parameters() if head is not None and p is head.weight), None)
        if name is None:
            return None
        index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index is not None:
            with open(index) as f:
                shard = json.load(f)["weight_map"].get(name)
            file = shard and cached_file(path, shard, _raise_exceptions_for_missing_entries=False)
        else:
            file = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if not file:
            return None
        with safe_open(file, "pt") as f:
            if name not in f.keys():
                return None
            return f.get_tensor(name).to(DTYPES[dtype])
    except Exception:  # a layout or an architecture this does not know: the whole model's loader decides
        return None


class BackboneRewardModel(torch.nn.Module):
    """backbone(hidden states) -> (head.token_scores - bias) * gain: a critic's values, on
    the rewards' scale; (head.pool of the token scores - bias) * gain: the reward."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module, tokenizer: Any = None,
                 lora: LoraSettings | None = None, base: str | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("bias", torch.zeros(()))
        self.gain = 1.0
        self.tokenizer = tokenizer  # None: the policy's token ids are scored as they are
        self.lora, self.base = lora or LoraSettings(), base

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: bool = False) -> torch.Tensor:
        """(B, T) the head's per-token scores, which ``head.pool`` makes the reward; with
        ``values``, a critic's per-token values: ``head.value_scores`` where the head has one
        (a head whose scores are not values by themselves), else the same scores."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
        ).last_hidden_state  # (B, T, H)
        dtype = next(self.head.parameters(), hidden).dtype  # the head stays fp32 on a bf16 backbone
        score = (getattr(self.head, "value_scores", None) if values else None) or self.head.token_scores
        if reads_tokens(self.head):
            return score(hidden.to(dtype), input_ids).float()  # (B, T)
        return score(hidden.to(dtype)).float()  # (B, T)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.token_scores(input_ids, attention_mask, values=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        token_scores = self.token_scores(input_ids, attention_mask, values=per_token)
        if per_token:  # as a critic: through forward, so wrapped engines (DDP, ZeRO) see it
            # shifted like the reward ("N+ details"): else values start off by a constant
            # that GAE turns into a length bias of the advantages
            return (token_scores - self.bias) * self.gain  # (B, T)
        return (self.head.pool(token_scores, pool_mask(self.head, attention_mask, response_mask)) - self.bias) * self.gain

    def set_bias(self, bias: float) -> None:
        self.bias.fill_(bias)

    def set_scale(self, gain: float) -> None:
        self.gain = float(gain)

    def save(self, path: str) -> None:
        save_with_tokenizer(self.backbone, self.tokenizer, path, self.lora, self.base)
        head = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(head, os.path.join(path, HEAD_FILE))
        meta = {"head_class": type(self.head).__name__, "bias": float(self.bias), "gain": self.gain,
                **{key: getattr(self.head, attr) for _, key, attr, _ in HEAD_SETTINGS if hasattr(self.head, attr)}}
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)


HEAD_SETTINGS = (("pool", "head_pool", "pool_kind", None), ("linear", "head_linear", "linear_kind", "tokens"))
"""A head's settings that change what its weights mean (``reward_head=logprob``'s): the setting,
its key in ``reward_model.json``, the head's attribute, and the value a checkpoint of that
head class saved before the setting existed had (None: not checked). Saved with the reward
model; a run that selects another value is refused when it loads it."""


class HFRewardLoader:
    def __init__(self, cfg: HFRewardConfig):
        check_settings("reward_model", cfg.dtype, cfg.lora)
        self.cfg = cfg
        quiet_transformers()

    def _backbone(self, path: str, quantization: Any = None) -> torch.nn.Module:
        model = load_model(path, "AutoModel", self.cfg.dtype, self.cfg.trust_remote_code, quantization)
        disable_dropout(model)
        return model

    @property
    def base_model(self) -> str | None:
        """What the RM stage builds on instead of the SFT checkpoint (None: the SFT one)."""
        return self.cfg.model

    def build(self, backbone_path: str, head: HeadBuilder) -> BackboneRewardModel:
        """A reward model to train: the backbone at ``backbone_path`` with its tokenizer, a
        fresh head, and a LoRA adapter if configured."""
        quantization = quantization_config(self.cfg.lora, DTYPES[self.cfg.dtype])
        backbone = self._backbone(backbone_path, quantization)
        tokenizer = load_tokenizer(backbone_path, self.cfg.trust_remote_code) if has_tokenizer(backbone_path) else None
        rm = BackboneRewardModel(backbone, head(backbone.config.hidden_size), tokenizer, self.cfg.lora, base=backbone_path)
        if hasattr(rm.head, "bind"):
            rm.head.bind(lm_head_weight(backbone, backbone_path, self.cfg.dtype, self.cfg.trust_remote_code))
        return self.adapt(rm)

    def adapt(self, rm: BackboneRewardModel) -> BackboneRewardModel:
        """A fresh LoRA adapter on the backbone when ``reward_model.lora.enabled`` (the
        pipeline calls this for PPO's critic)."""
        if self.cfg.lora.enabled and not is_peft(rm.backbone):
            rm.backbone = apply_lora(rm.backbone, self.cfg.lora, "FEATURE_EXTRACTION")
        return rm

    def load(self, path: str, head: HeadBuilder) -> BackboneRewardModel:
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"{path!r} is not a reward-model checkpoint: {META_FILE} is missing.")
        with open(meta_path) as f:
            meta = json.load(f)
        backbone = self._backbone(path)
        tokenizer = load_tokenizer(path, self.cfg.trust_remote_code) if has_tokenizer(path) else None
        rm = BackboneRewardModel(backbone, head(backbone.config.hidden_size), tokenizer, self.cfg.lora, base=path)
        if type(rm.head).__name__ != meta["head_class"]:
            raise CheckpointError(
                f"The reward model at {path!r} was trained with head {meta['head_class']}, but the run "
                f"selects {type(rm.head).__name__}. Select the matching reward_head."
            )
        for setting, key, attr, before in HEAD_SETTINGS:  # the weights, bias and gain hold for one choice only
            saved, chosen = meta.get(key, before), getattr(rm.head, attr, None)  # the head's class matches
            if saved is not None and chosen is not None and saved != chosen:
                raise CheckpointError(f"The reward model at {path!r} was trained with reward_head.{setting}={saved}, but "
                                      f"the run selects reward_head.{setting}={chosen}. Set reward_head.{setting}={saved}.")
        try:
            state = load_file(os.path.join(path, HEAD_FILE))
            if hasattr(rm.head, "bind") and "unembedding" in state:
                rm.head.bind(state["unembedding"])
            rm.head.load_state_dict(state)
        except Exception as exc:
            raise CheckpointError(f"Corrupt reward head in {path!r}: {exc}") from exc
        rm.set_bias(meta["bias"])
        rm.set_scale(meta.get("gain", 1.0))  # saved before rm.scale existed: unscaled
        return rm


@hookimpl
def rlhfkit_register_reward_models(register):
    register("hf_rm", HFRewardLoader, HFRewardConfig)
