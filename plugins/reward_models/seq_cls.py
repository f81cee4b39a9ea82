"""``reward_model=seq_cls``: an ``AutoModelForSequenceClassification`` with ``num_labels=1``
as the reward model, such as one trained elsewhere (OpenAssistant's, Skywork's, ...)::

    rlhfkit stages=[sft,rl] reward_model=seq_cls reward_model.path=/models/my-rm

With ``reward_model.path`` set and no ``rm`` stage, RL scores with that model as it is (its
own tokenizer; the policy's text is re-tokenized for it when the vocabularies differ). With
an ``rm`` stage, the classifier is fine-tuned from ``reward_model.path``, or from the SFT
checkpoint with a new score head. The reward-head plugins do not apply: the model's own
score head is used, at every position for a critic and at the last attended token for the
reward. PPO's critic is a trainable copy of this model when it reads the policy's tokens,
and otherwise a classifier built on the SFT checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from rlhfkit import hookimpl
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import HeadBuilder
from rlhfkit.plugins.hf_common import (
    DTYPES, LoraSettings, apply_lora, check_settings, has_tokenizer, is_peft, load_model, load_tokenizer, quantization_config,
    save_with_tokenizer,
)
from rlhfkit.plugins.policies.hf import quiet_transformers
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.tokenize import positions
from rlhfkit.settings import one_of

META_FILE = "reward_model.json"


@dataclass
class SeqClsConfig:
    path: Optional[str] = None
    """A trained sequence classifier (num_labels=1): hub name or directory. Used directly
    when the run has no ``rm`` stage; the starting point when it has one."""
    dtype: str = one_of(*DTYPES)
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA/QLoRA for fine-tuning it (RM stage, critic)."""


class SeqClsRewardModel(torch.nn.Module):
    """score(hidden) - ``bias`` at every position (a critic's values, on the rewards'
    scale); the reward is the last attended position's. ``tokenizer`` is None when it
    reads the policy's tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lora: LoraSettings, base: str | None):
        super().__init__()
        self.model = model
        self.register_buffer("bias", torch.zeros(()))
        self.gain = 1.0
        self.tokenizer, self.lora, self.base = tokenizer, lora, base

    @property
    def head(self) -> torch.nn.Module:
        """The classifier's score head (what an ensemble member's ``rm.member_init_std`` perturbs)."""
        return self._parts()[1]

    def _parts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        inner = self.model.get_base_model() if is_peft(self.model) else self.model
        head = getattr(inner, "score", None)
        if head is None:
            raise ConfigError(f"{type(inner).__name__} has no 'score' head; reward_model=seq_cls needs a decoder "
                              "classifier (GPT-2, Llama, Qwen, Mistral ... ForSequenceClassification).")
        return inner.base_model, head

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone, head = self._parts()
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions(attention_mask)).last_hidden_state
        return head(hidden).squeeze(-1).float()  # (B, T)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        # response_mask: unused, the classifier reads its last attended token
        scores = self.token_values(input_ids, attention_mask)
        if per_token:  # a critic's values, shifted like the reward (see hf_rm)
            return (scores - self.bias) * self.gain  # (B, T)
        T = attention_mask.shape[1]
        last = T - 1 - attention_mask.flip(-1).long().argmax(-1)  # last attended position (left or right padding)
        return (scores.gather(1, last.unsqueeze(1)).squeeze(1) - self.bias) * self.gain

    def set_bias(self, bias: float) -> None:
        self.bias.fill_(bias)

    def set_scale(self, gain: float) -> None:
        self.gain = float(gain)

    def save(self, path: str) -> None:
        save_with_tokenizer(self.model, self.tokenizer, path, self.lora, self.base)
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump({"head_class": "seq_cls", "bias": float(self.bias), "gain": self.gain}, f, indent=2)


class SeqClsLoader:
    def __init__(self, cfg: SeqClsConfig):
        check_settings("reward_model", cfg.dtype, cfg.lora)
        self.cfg = cfg
        quiet_transformers()

    @property
    def base_model(self) -> str | None:
        """What the RM stage fine-tunes instead of the SFT checkpoint."""
        return self.cfg.path

    @property
    def pretrained_path(self) -> str | None:
        """A trained reward model to use when the run has no ``rm`` stage."""
        return self.cfg.path

    def _load(self, path: str, quantization: Any = None) -> SeqClsRewardModel:
        model = load_model(path, "AutoModelForSequenceClassification", self.cfg.dtype, self.cfg.trust_remote_code,
                           quantization, num_labels=1)
        if model.config.num_labels != 1:
            raise CheckpointError(f"{path}: a reward model has num_labels=1; this classifier has {model.config.num_labels}.")
        disable_dropout(model)
        tokenizer = load_tokenizer(path, self.cfg.trust_remote_code) if has_tokenizer(path) else None
        if model.config.pad_token_id is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        rm = SeqClsRewardModel(model, tokenizer, self.cfg.lora, base=path)
        meta = os.path.join(path, META_FILE)
        if os.path.isfile(meta):
            with open(meta) as f:
                saved = json.load(f)
            rm.set_bias(float(saved.get("bias", 0.0)))
            rm.set_scale(float(saved.get("gain", 1.0)))
        return rm

    def build(self, backbone_path: str, head: HeadBuilder) -> SeqClsRewardModel:
        """A classifier to train from ``backbone_path`` (a causal LM such as the SFT
        checkpoint gets a new score head)."""
        quantization = quantization_config(self.cfg.lora, DTYPES[self.cfg.dtype])
        return self.adapt(self._load(backbone_path, quantization))

    def adapt(self, rm: SeqClsRewardModel) -> SeqClsRewardModel:
        if self.cfg.lora.enabled and not is_peft(rm.model):
            rm.model = apply_lora(rm.model, self.cfg.lora, "SEQ_CLS")
        return rm

    def load(self, path: str, head: HeadBuilder) -> SeqClsRewardModel:
        return self._load(path)


@hookimpl
def rlhfkit_register_reward_models(register):
    register("seq_cls", SeqClsLoader, SeqClsConfig)
