"""Keep credentials out of saved configs and logs.

A value is a secret when its key names one (``api_key``, ``wandb_api_key``, ``hf_token``,
``token``, ``secret``, ``password``, ...) or when it equals the value of a credential
environment variable (``WANDB_API_KEY``, ``HF_TOKEN``, ...). Secrets become
``"***REDACTED***"`` in ``config.yaml``, in the config handed to loggers (and so W&B), and
in anything else passed through :func:`redact`.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***REDACTED***"
SECRET_KEY = re.compile(r"(^|[_\-.])(api[_\-]?key|token|access[_\-]?token|auth[_\-]?token|secret|secret[_\-]?key|password|passwd|credentials?)$", re.I)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY")
_TOKEN_SHAPES = (re.compile(r"^hf_[A-Za-z0-9]{30,}$"), re.compile(r"^(local-)?[0-9a-f]{40}$"), re.compile(r"^sk-[A-Za-z0-9_\-]{20,}$"))


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.search(key))


def _secret_values() -> set[str]:
    return {v for k in SECRET_ENV if (v := os.environ.get(k))}


def is_secret_value(value: Any, known: set[str] | None = None) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if value in (known if known is not None else _secret_values()):
        return True
    return any(p.match(value) for p in _TOKEN_SHAPES)


def redact(obj: Any, _known: set[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, scalars) with every secret replaced."""
    known = _secret_values() if _known is None else _known
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v, known)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, known) for v in obj)
    if is_secret_value(obj, known):
        return REDACTED
    if isinstance(obj, str):
        for v in known:  # a secret embedded in a longer string (a URL, a command line)
            obj = obj.replace(v, REDACTED)
    return obj
