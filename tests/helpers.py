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

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
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
