"""``reward_model=hf_rm``: a Hugging Face backbone (``AutoModel``) with a reward head.

InstructGPT initialises the reward model from the SFT model; ``build`` does that from the
SFT checkpoint. Saved as a Hugging Face directory (the backbone, loadable with
``AutoModel.from_pretrained``) plus ``reward_head.safetensors`` and ``reward_model.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from rlhfkit import hookimpl
from rlhfkit.errors import CheckpointError
from rlhfkit.interfaces import HeadBuilder
from rlhfkit.plugins.policies.hf import DTYPES, disable_dropout, quiet_transformers
from rlhfkit.sequences import positions

HEAD_FILE, META_FILE = "reward_head.safetensors", "reward_model.json"


@dataclass
class HFRewardConfig:
    dtype: str = "float32"
    """Backbone dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""


class BackboneRewardModel(torch.nn.Module):
    """backbone(hidden states) -> head.token_scores -> head.pool - bias."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("bias", torch.zeros(()))

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
        ).last_hidden_state  # (B, T, H)
        return self.head.token_scores(hidden).float()  # (B, T)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        token_scores = self.token_values(input_ids, attention_mask)
        if per_token:  # as a critic: through forward, so wrapped engines (DDP, ZeRO) see it
            return token_scores  # (B, T)
        return self.head.pool(token_scores, attention_mask) - self.bias  # (B,)

    def set_bias(self, bias: float) -> None:
        self.bias.fill_(bias)

    def save(self, path: str) -> None:
        self.backbone.save_pretrained(path, safe_serialization=True)
        head = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(head, os.path.join(path, HEAD_FILE))
        meta = {"head_class": type(self.head).__name__, "bias": float(self.bias)}
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)


class HFRewardLoader:
    def __init__(self, cfg: HFRewardConfig):
        self.cfg = cfg
        quiet_transformers()

    def _backbone(self, path: str) -> torch.nn.Module:
        from transformers import AutoModel

        if not os.path.isdir(path):
            raise CheckpointError(f"No model directory at {path!r} to build the reward model from.")
        model = AutoModel.from_pretrained(path, dtype=DTYPES[self.cfg.dtype], trust_remote_code=self.cfg.trust_remote_code)
        disable_dropout(model)
        return model

    def build(self, backbone_path: str, head: HeadBuilder) -> BackboneRewardModel:
        backbone = self._backbone(backbone_path)
        return BackboneRewardModel(backbone, head(backbone.config.hidden_size))

    def load(self, path: str, head: HeadBuilder) -> BackboneRewardModel:
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"{path!r} is not a reward-model checkpoint: {META_FILE} is missing.")
        with open(meta_path) as f:
            meta = json.load(f)
        rm = self.build(path, head)
        if type(rm.head).__name__ != meta["head_class"]:
            raise CheckpointError(
                f"The reward model at {path!r} was trained with head {meta['head_class']}, but the run "
                f"selects {type(rm.head).__name__}. Select the matching reward_head."
            )
        try:
            rm.head.load_state_dict(load_file(os.path.join(path, HEAD_FILE)))
        except Exception as exc:
            raise CheckpointError(f"Corrupt reward head in {path!r}: {exc}") from exc
        rm.set_bias(meta["bias"])
        return rm


@hookimpl
def rlhfkit_register_reward_models(register):
    register("hf_rm", HFRewardLoader, HFRewardConfig)
