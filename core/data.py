"""Bad data never costs a run: each bad record is either a clear error naming its file,
line and field, or skipped and counted (``bad_data=error|skip``). Dataset plugins report
through :class:`DataIssues`; the pipeline adds the checks that need a tokenizer (a prompt
longer than the model's context)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rlhfkit.errors import DataError

FIX = "Fix or remove the record, or set bad_data=skip to skip bad records and count them."


class DataIssues:
    """Collects bad records: raises at the first one (``mode="error"``) or counts them by
    reason and keeps the first place each reason occurred (``mode="skip"``)."""

    def __init__(self, mode: Any = "error"):
        mode = getattr(mode, "value", mode)
        if mode not in ("error", "skip"):
            raise DataError(f"bad_data={mode!r}: choose error or skip.")
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self._seen: set[str] = set()  # a record read twice (train and test, two stages) counts once

    def bad(self, where: str, reason: str, detail: str = "") -> None:
        """Record ``where`` (``file:line``) as bad for ``reason`` (a short, countable
        phrase, like ``missing field 'chosen'``)."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.mode == "error":
            raise DataError(f"{message}. {FIX}")
        if where in self._seen:
            return
        self._seen.add(where)
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.counts)

    def summary(self) -> str:
        return "; ".join(f"{n} x {reason} (first at {self.first[reason]})" for reason, n in self.counts.most_common())


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """The strings ``tokenizer`` reads as one special token wherever they occur in text (its
    EOS, PAD, UNK, chat markers...), each with its role (``eos_token``) or ``special token``.
    Data holding one literally would not mean what it says: the files plugin makes such a
    record bad data (see docs/reliability.md)."""
    found = {t.content: "special token" for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
             if getattr(t, "special", False)}
    found.update({t: "special token" for t in getattr(tokenizer, "all_special_tokens", None) or []})
    for role, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if isinstance(value, str) and value in found:
            found[value] = role if found[value] == "special token" else f"{found[value]} and {role}"
    return {t: r for t, r in found.items() if t}


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` takes (positions), or None if it does not say."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and 0 < value < 10**7:
            return value
    return None


def describe(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")
