"""Atomic checkpoint directories: write into a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_directory(final: str) -> Iterator[str]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` in
    one rename, so readers see the old checkpoint or the new one, never half of one."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
    try:
        yield tmp
        for root, _, files in os.walk(tmp):  # data on disk before the rename makes it visible
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_training_state(path: str, engines: dict[str, Any], scalars: dict[str, Any], is_main: bool) -> None:
    """An algorithm's resumable state: each engine's optimizer/scheduler state under
    ``path/<name>`` (sharded where the backend shards it) and small scalar state (the KL
    controller's coefficient) as ``path/algorithm.json``. Call on every rank."""
    for name, engine in engines.items():
        engine.save_state(os.path.join(path, name))
    if is_main:
        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "algorithm.json"), json.dumps(scalars, indent=2))
