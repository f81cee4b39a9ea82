"""Checkpoints that survive a kill: atomic directories (write into a temporary sibling,
then rename), a manifest of every file's size and SHA-256 written last, so that a partial or
corrupt checkpoint is detected and skipped, and a store that keeps the last N per stage."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_directory(final: str, on_no_space: Callable[[], Exception] | None = None) -> Iterator[str]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` in
    one rename, so readers see the old checkpoint or the new one, never half of one. If the
    disk fills up meanwhile, the temporary directory is removed and ``on_no_space()`` is
    raised (given one)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
    try:
        yield tmp
        fsync_tree(tmp)  # data on disk before the rename makes it visible
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        if discard(tmp, exc) and on_no_space is not None:
            raise on_no_space() from None
        raise


def discard(tmp: str, exc: BaseException) -> bool:
    """Remove the half-written ``tmp`` after ``exc``; return whether the disk filling up
    caused it (checked before the removal frees the space)."""
    full = no_space_left(exc, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return full


def no_space_left(exc: BaseException, path: str) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means the disk is full: an
    ``OSError`` with ENOSPC or EDQUOT, or any error while the file system has (almost) no
    room left (torch's zip writer and C++ streams lose the errno: ``unexpected pos 103680
    vs 103572``, ``basic_ios::clear``). Call it before removing what was written."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, Exception):  # Ctrl-C, exit
        return False
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False


def no_space_message(where: str, last_good: str | None, run_dir: str) -> str:
    return (f"no space left on device in {where}; the last good checkpoint is "
            f"{last_good or 'none (the stage starts over)'}. Free some space, then continue with: "
            f"rlhfkit resume={run_dir}")


def remove_temporaries(parent: str, prefix: str = ".") -> None:
    """Delete what killed atomic writers left in ``parent``: ``<prefix>*.tmp-*`` and
    ``<prefix>*.old-*`` entries. Only safe while no other writer uses ``parent`` (under the
    run's :func:`run_lock`)."""
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if name.startswith(prefix) and (".tmp-" in name or ".old-" in name):
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


LOCK = ".rlhfkit.lock"
_held: dict[str, int] = {}  # run directory (real path) -> the locked file descriptor


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.rlhfkit.lock`` while entered, so that a
    second rlhfkit process on the same run directory stops at once, naming the first.
    Re-entrant within a process; the kernel drops the lock when the process dies, however."""
    from rlhfkit.errors import ConfigError

    key = os.path.realpath(run_dir)
    if key in _held:
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"another rlhfkit process (pid {pid}) is using {run_dir}. Wait for it to end or stop it, "
                          "or pick another hydra.run.dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def fsync_tree(root: str) -> None:
    """Flush every file under ``root`` to disk."""
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())


def load_tensors(path: str, allowed: str = "tensors and numbers", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of
    them (``allowed`` says what else, for the message), never code. A file that holds more
    is refused with a :class:`CheckpointError`."""
    import pickle

    import torch

    from rlhfkit.errors import CheckpointError

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds more than {allowed}, so rlhfkit will not load it "
            f"(loading it could run arbitrary code): {str(exc).splitlines()[0]}"
        ) from None


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str, data: bytes) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(root: str, **info: Any) -> None:
    """Record every file under ``root`` (size and SHA-256) in ``root/manifest.json``.
    Written last: a directory without it was never finished."""
    files = {f: {"bytes": os.path.getsize(os.path.join(root, f)), "sha256": _sha256(os.path.join(root, f))} for f in _files(root)}
    atomic_write_text(os.path.join(root, MANIFEST), json.dumps({**info, "time": time.time(), "files": files}, indent=1))


def verify(root: str) -> str | None:
    """None if ``root`` is a complete checkpoint whose files match its manifest; otherwise
    what is wrong with it, in words."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing (the checkpoint was never finished)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, meta in files.items():
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != meta["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {meta['bytes']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256 checksum"
    return None


def read_manifest(root: str) -> dict[str, Any]:
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)


_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointStore:
    """Training checkpoints of one run: ``<run_dir>/checkpoints/<stage>/step-<N>/``, each
    complete with a manifest, the last ``keep_last`` kept per stage.

    Several ranks may write into one checkpoint (sharded optimizer state): ``save`` is
    called on every rank with ``share`` (rank 0's temporary path to every rank) and
    ``barrier``; rank 0 writes the manifest and renames the directory into place."""

    def __init__(self, run_dir: str, keep_last: int, is_main: bool = True,
                 share: Callable[[str], str] = lambda x: x, barrier: Callable[[], None] = lambda: None):
        if keep_last < 1:
            from rlhfkit.errors import ConfigError

            raise ConfigError(f"checkpoint.keep_last={keep_last}: keep at least 1 checkpoint.")
        self.run_dir, self.root = run_dir, os.path.join(run_dir, "checkpoints")
        self.keep_last, self.is_main, self.share, self.barrier = keep_last, is_main, share, barrier

    def path(self, stage: str, step: int) -> str:
        return os.path.join(self.root, stage, f"step-{step:08d}")

    def steps(self, stage: str) -> list[int]:
        """Steps with a checkpoint directory (complete or not), newest first."""
        try:
            names = os.listdir(os.path.join(self.root, stage))
        except FileNotFoundError:
            return []
        return sorted((int(m.group(1)) for m in map(_STEP_DIR.match, names) if m), reverse=True)

    def save(self, stage: str, step: int, write: Callable[[str], None], **info: Any) -> str:
        """Call ``write(tmp_dir)`` on every rank, then publish ``tmp_dir`` atomically as the
        checkpoint of ``stage`` at ``step`` and prune old ones. Returns the final path."""
        final = self.path(stage, step)
        parent = os.path.dirname(final)
        tmp = ""
        if self.is_main:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=parent)
        tmp = self.share(tmp)
        try:
            write(tmp)
            self.barrier()
            if self.is_main:
                fsync_tree(tmp)  # data on disk before the rename
                write_manifest(tmp, stage=stage, step=step, **info)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self.prune(stage)
        except BaseException as exc:
            if self.is_main and discard(tmp, exc):
                from rlhfkit.errors import CheckpointError

                raise CheckpointError(no_space_message(parent, self.latest(stage, lambda _: None), self.run_dir)) from None
            raise
        self.barrier()
        return final

    def prune(self, stage: str) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints (and any incomplete
        one older than the newest complete one)."""
        kept = 0
        for step in self.steps(stage):
            path = self.path(stage, step)
            if kept < self.keep_last and os.path.isfile(os.path.join(path, MANIFEST)):
                kept += 1
            elif kept:
                shutil.rmtree(path, ignore_errors=True)
        remove_temporaries(os.path.join(self.root, stage), ".step-")  # left by a killed writer

    def valid(self, stage: str, warn: Callable[[str], None]) -> Iterator[str]:
        """The checkpoints of ``stage`` that verify against their manifests, newest first;
        each one that does not is reported through ``warn`` and skipped."""
        for step in self.steps(stage):
            path = self.path(stage, step)
            problem = verify(path)
            if problem is None:
                yield path
            else:
                warn(f"checkpoint {path} is corrupt or partial: {problem}. Skipping it in favour of an older one.")

    def latest(self, stage: str, warn: Callable[[str], None]) -> str | None:
        return next(self.valid(stage, warn), None)
