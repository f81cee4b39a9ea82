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
