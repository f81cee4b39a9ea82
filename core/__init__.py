"""rlhfkit: plugin-based InstructGPT pipelines (SFT -> reward model -> RL).

Plugins implement the hooks in :mod:`rlhfkit.hookspecs`, marked with :data:`hookimpl`.
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "rlhfkit"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "PROJECT", "__version__"]
