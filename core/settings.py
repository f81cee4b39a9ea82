"""What each config field accepts, declared on the dataclass, and the walk that checks it.

A schema (the run's own or a plugin's) declares the allowed range of a field where it
defines it, and may check settings that depend on each other in a ``validate(self, run)``
method (``run``: :class:`rlhfkit.config.RunInfo`) that raises :class:`Invalid`::

    @dataclass
    class ReinforceConfig:
        lr: float = bounded(1e-4, gt=0)
        num_samples: int = bounded(4, ge=2)
        precision: str = one_of("fp32", "bf16")

        def validate(self, run: RunInfo) -> None:
            if self.num_samples > 64:
                raise Invalid("num_samples", self.num_samples, "must be <= 64")

A float field with no declared range must still be a finite number. The run checks every
field of the composed config (:func:`rlhfkit.config.validate_run`) before its directory
exists, and reports the first bad one as ``sft.batch_size=-1: must be >= 1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig

from rlhfkit.errors import ConfigError

ALLOWED = "rlhfkit_allowed"  # the dataclass field metadata key


@dataclass(frozen=True)
class Allowed:
    """The values a field accepts: bounds (``ge``/``gt``/``le``/``lt``) or a set of choices.
    None always passes (an Optional field's "off")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if value is None or isinstance(value, bool):
            return None
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}"
        if not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.describe()}" if self.bounded else "must be a finite number"
        low = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        return None if low and high else f"must be {self.describe()}"

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def describe(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if self.ge is not None else '>'} {lo[1:]}"
        return f"{'<=' if self.le is not None else '<'} {hi[:-1]}"


FINITE = Allowed()


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field with its allowed range: ``steps: int = bounded(500, ge=1)``."""
    return field(default=default, metadata={ALLOWED: Allowed(ge=ge, gt=gt, le=le, lt=lt)})


def one_of(*choices: Any, default: Any = dataclasses.MISSING) -> Any:
    """A field that takes one of ``choices`` (default: the first): ``precision: str = one_of("fp32", "bf16")``."""
    return field(default=choices[0] if default is dataclasses.MISSING else default,
                 metadata={ALLOWED: Allowed(choices=tuple(choices))})


class Invalid(ConfigError):
    """A bad setting found by a schema's ``validate``: the field (relative to the schema's
    own node), its value and what it must be. The run names it with its full path."""

    def __init__(self, field: str, value: Any, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={show(value)}: {problem}")

    def at(self, path: str) -> ConfigError:
        return ConfigError(f"{join(path, self.field)}={show(self.value)}: {self.problem}")


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{','.join(show(v) for v in value)}]"
    return str(value)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (``RolloutConfig``, ``Optional[LoraSettings]``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def check_keys(node: Any, schema: type, path: str) -> None:
    """Every key under a schema-typed node is one of the schema's fields: ``+sft.stepz=3``
    (Hydra's ``+`` adds keys even to typed nodes) is an error naming the closest field."""
    if not isinstance(node, DictConfig):
        return
    names = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {join(path, close[0])}? " if close else ""
            raise ConfigError(f"{join(path, str(key))}: no such setting; {hint}"
                              f"{path or 'the run config'} has: {', '.join(n for n in names if not n.startswith('_'))}.")
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        inner = _dataclass_in(hints.get(f.name))
        if inner is not None and f.name in node:
            check_keys(node._get_node(f.name), inner, join(path, f.name))


def check_values(obj: Any, path: str, run: Any) -> None:
    """Every field of the dataclass instance ``obj`` (nested ones too) is in its declared
    range, then the schema's own ``validate(run)`` passes."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = join(path, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, where, run)
            continue
        allowed = f.metadata.get(ALLOWED) or (FINITE if isinstance(value, float) else None)
        problem = allowed.problem(value) if allowed is not None else None
        if problem:
            raise ConfigError(f"{where}={show(value)}: {problem}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate(run)
        except Invalid as exc:
            raise exc.at(path) from None
