"""What a stage needs to stop anywhere and continue exactly: RNG states, data positions,
SIGTERM and Ctrl-C handling, the engines a stage prepared, and the divergence guard.

The training loop (:mod:`rlhfkit.loop`) checkpoints a stage as ``checkpoints/<stage>/step-<N>/`` (see
:class:`rlhfkit.checkpoint.CheckpointStore`)::

    engine-0/ engine-1/ ...   each engine's save_state (weights, optimizer, scheduler)
    rng-<rank>.pt             this rank's Python, NumPy, torch and CUDA RNG states
    trainer.pt                step, data positions, the algorithm's and the guard's state
    manifest.json             size and SHA-256 of every file, written last
"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from rlhfkit.errors import RlhfkitError


class Preempted(RlhfkitError):
    """SIGTERM or a first Ctrl-C arrived; a checkpoint was written. Exit code 128 + the
    signal's number: 143 (SIGTERM), 130 (SIGINT)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class DivergenceError(RlhfkitError):
    """The divergence guard stopped the run. Exit code 3."""


# --- RNG --------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (each stage starts from its own seed)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


# --- data position -----------------------------------------------------------------------


class Batches:
    """Endless shuffled batches of indices into ``n`` items, reshuffled every epoch,
    deterministic in ``seed``. Its state is the number of batches drawn: loading it
    replays the shuffles up to there (index permutations only, no data is touched)."""

    def __init__(self, n: int, batch_size: int, seed: int, transform: Callable[[list[int]], Any] | None = None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"Batches needs at least one item and a batch size >= 1 (got {n}, {batch_size}).")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.transform = transform
        self.drawn = 0
        self._it = self._indices()

    def _indices(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(self.n, generator=g).tolist()
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield perm[i : i + self.batch_size]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        self.drawn += 1
        idx = next(self._it)
        return self.transform(idx) if self.transform else idx

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn, self._it = 0, self._indices()
        for _ in range(int(state["drawn"])):
            next(self._it)
        self.drawn = int(state["drawn"])


# --- preemption -----------------------------------------------------------------------------


class Preemption:
    """While entered, SIGTERM and a first Ctrl-C (SIGINT) set :attr:`requested` instead of
    killing the process; the training loop checkpoints at the next step boundary and raises
    :class:`Preempted` (see :meth:`stopped`). A second Ctrl-C stops at once
    (``KeyboardInterrupt``). Outside the main thread (no signal handlers there) it does nothing."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGTERM
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.NAMES}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not self.requested:
            self.requested, self.signum = True, signum
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":  # torchrun: every rank gets it
            os.write(2, b"\nrlhfkit: Ctrl-C: finishing this step and writing a checkpoint; "
                        b"press Ctrl-C again to stop at once (without one).\n")

    def stopped(self, what: str) -> Preempted:
        """The error to raise once the checkpoint is written: ``<signal>: <what>``."""
        return Preempted(f"{self.NAMES[self.signum]}: {what}", self.signum)

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


# --- the engines of a stage ---------------------------------------------------------------


class TrackingBackend:
    """The run's backend, recording every engine prepared through it (in order), so that
    the training loop can checkpoint, guard and roll back the engines an algorithm made."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.engines: list[Any] = []

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        engine = self._backend.prepare(*args, **kwargs)
        self.engines.append(engine)
        return engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def skipped_steps(self) -> int:
        return sum(int(getattr(e, "skipped_steps", 0)) for e in self.engines)


# --- the divergence guard ------------------------------------------------------------------


@dataclass
class Guard:
    """Counts consecutive bad steps of one stage. A bad step: an engine skipped its update
    (non-finite loss or gradient, decided alike on every rank), or the step's KL to the
    reference (RL) is past ``kl_bound``."""

    max_bad_steps: int
    kl_bound: float | None = None
    consecutive: int = 0
    skipped_total: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def check(self, step: int, skipped: int, kl: float | None = None) -> list[str]:
        """Record ``step``, whose engines skipped ``skipped`` updates and whose KL to the
        reference (the same on every rank; None: it has none) was ``kl``; return why it was
        bad (empty if it was good)."""
        reasons = []
        if skipped:
            reasons.append(f"{skipped} update(s) skipped: non-finite loss or gradient")
        if self.kl_bound is not None and kl is not None and not (kl <= self.kl_bound):
            reasons.append(f"rollout KL {kl:.3g} past guard.kl_bound={self.kl_bound:g}")
        self.skipped_total += skipped
        if reasons:
            self.consecutive += 1
            self.history = (self.history + [{"step": step, "reasons": reasons}])[-20:]
        else:
            self.consecutive = 0
        return reasons

    @property
    def tripped(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def metrics(self) -> dict[str, float]:
        return {"guard/skipped_steps": float(self.skipped_total), "guard/rollbacks": float(self.rollbacks),
                "guard/lr_scale": self.lr_scale}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        self.consecutive = 0
