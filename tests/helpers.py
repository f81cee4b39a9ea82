"""Shared by tests: compose a config the way the CLI does, and run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

SMOKE = ["experiment=smoke"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlhfkit.cli import setup

    setup()
    with initialize_config_module(config_module="rlhfkit.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_wandb_run(path: str) -> dict:
    """Decode an offline W&B run file (``run-*.wandb``: LevelDB-log framed protobuf
    records; wandb >= 0.19 has no Python reader) into its run record's group, job type and
    config, and the logged history rows and summary, all JSON-decoded."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    import time

    def decode(data: bytes) -> list:
        block, pos, records, partial = 32768, 7, [], b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # block trailer: padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 0 and length == 0:
                continue
            partial = chunk if kind in (1, 2) else partial + chunk
            if kind in (1, 4):
                r = pb.Record()
                r.ParseFromString(partial)
                records.append(r)
                partial = b""
        return records

    # wandb's service process may still be flushing when finish() returns: wait (up to
    # 30 s) until the file holds its exit record, the last one a finished run writes
    deadline = time.time() + 30
    while True:
        data = open(path, "rb").read()
        assert data[:4] == b":W&B", f"{path} is not a W&B run file"
        records = decode(data)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.2)

    def key(item):
        return item.key or "/".join(item.nested_key)

    out = {"group": None, "job_type": None, "config": {}, "history": [], "summary": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["job_type"] = r.run.run_group, r.run.job_type
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in r.summary.update})
    for row in out["history"]:  # the summary holds each key's last logged value
        out["summary"].setdefault("_from_history", {}).update(row)
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_model(arch: str, path: str, texts: list[str], chat_template: str | None = None, seq_cls: bool = False) -> str:
    """A tiny pretrained-style model saved to ``path``: a byte-level BPE tokenizer trained
    on ``texts`` and a GPT-2 or Llama model built from config (random weights), loadable
    with ``from_pretrained(path)`` like any hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
        LlamaForSequenceClassification, PreTrainedTokenizerFast,
    )
    import torch

    torch.manual_seed(0)
    eos, bos, pad = ("<|endoftext|>", "<|endoftext|>", "<pad>") if arch == "gpt2" else ("</s>", "<s>", "<unk>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted({eos, bos, pad, "<|user|>", "<|assistant|>", "<|system|>"})
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad)
    if chat_template:
        fast.chat_template = chat_template
    ids = dict(vocab_size=len(fast), eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=1, **ids)
        model = (GPT2ForSequenceClassification if seq_cls else GPT2LMHeadModel)(config)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=128, num_labels=1, **ids)
        model = (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_to_hf_cache(model_dir: str, hub_cache: str, repo_id: str, revision: str = "0" * 40) -> str:
    """Copy a saved model into a Hugging Face hub cache (``$HF_HOME/hub``) the way
    ``hf download`` lays it out: ``models--org--name/snapshots/<revision>/`` with
    ``refs/main`` naming the revision. Returns the snapshot directory."""
    import shutil

    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    shutil.copytree(model_dir, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot
