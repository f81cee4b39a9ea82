"""``data=files`` (preset ``data=jsonl``): your own data, from local files (JSON Lines, JSON, Parquet) or a Hugging
Face dataset by name, in the standard RLHF formats. One file can feed every stage::

    rlhfkit data=jsonl data.path=prefs.jsonl        # preferences: RM; chosen -> SFT; prompts -> RL
    rlhfkit data=jsonl data.sft=demos.jsonl data.comparisons=ranked.jsonl data.prompts=prompts.jsonl

Formats, detected per record (or fixed with ``data.format``):

=================== ==================================================================
prompt_completion   ``{"prompt": ..., "completion": ...}`` (SFT; ``response`` works too)
messages            ``{"messages": [{"role": "user", "content": ...}, ...]}`` (SFT: the
                    last assistant turn is the completion)
pairs               ``{"prompt": ..., "chosen": ..., "rejected": ...}``
hh                  ``{"chosen": transcript, "rejected": transcript}`` (Anthropic HH: the
                    shared "\\n\\nHuman: ... \\n\\nAssistant:" prefix becomes the prompt)
ranked              ``{"prompt": ..., "responses": [...], "ranking": [1, 2, 2, 3]}`` (1 is
                    best; ties allowed) or ``"scores": [...]`` (higher is better)
prompt              ``{"prompt": ...}`` (RL prompts)
=================== ==================================================================

Any record with a prompt may carry **check data** for verifiable rewards
(``reward=python_exec``): a reference ``answer`` (a string or a number) and/or ``tests``, a
list of Python statements (usually asserts) run after the response, as code-RL datasets
ship them (MBPP: ``data.fields.prompt=text data.fields.completion=code
data.fields.tests=test_list``). :meth:`FileData.checks` returns them by prompt (the first
record's, if a prompt occurs twice). Tests that are not a list of strings, a test that is
not valid Python, or an answer that is neither a string nor a number make the record bad.

``data.fields.<name>=<your field>`` maps field names (``data.fields.prompt=question``).
Chat messages are rendered with the policy tokenizer's chat template when it has one,
else as Human/Assistant turns. A record that does not fit is an error naming the file,
line and field, or (``bad_data=skip``) is skipped and counted. A source with no usable
record (an empty file, or every record skipped) is an error naming it.

Text that holds one of the policy tokenizer's special tokens literally (``<eos>`` for the
tiny models' word-level tokenizer; ``<|endoftext|>``, chat markers and the like for a
pretrained one) is a bad record too: tokenized, it would be that special token (an EOS
in mid-response), not the text. Give conversations as ``messages``; they are rendered with
the tokenizer's chat template.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from rlhfkit import hookimpl
from rlhfkit.config import BadData
from rlhfkit.data import DataIssues, special_tokens
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.interfaces import Check, Comparison, Example, Sampler
from rlhfkit.settings import bounded, one_of

FORMATS = ("auto", "prompt_completion", "messages", "pairs", "hh", "ranked", "prompt")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass
class FieldNames:
    """The name each format's field has in your files (``data.fields.prompt=question``)."""

    prompt: str = "prompt"
    completion: str = "completion"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    ranking: str = "ranking"
    scores: str = "scores"
    answer: str = "answer"
    tests: str = "tests"


@dataclass
class FileDataConfig:
    path: Optional[str] = None
    """A file (.jsonl, .json, .parquet), a directory saved by ``datasets``, or a Hugging Face
    dataset name: the source for every stage not given its own below."""
    sft: Optional[str] = None
    """Demonstrations for SFT (default: ``path``; from preferences, the best response)."""
    comparisons: Optional[str] = None
    """Pairs or ranked completions for the reward model (default: ``path``)."""
    prompts: Optional[str] = None
    """Prompts for RL (default: ``path``'s prompts)."""
    test_path: Optional[str] = None
    """Held-out records (any format); default: ``test_fraction`` of each source."""
    test_fraction: float = bounded(0.05, ge=0, lt=1)
    """Share of each source held out for evaluation when there is no ``test_path``."""
    split: str = "train"
    """Split of a Hugging Face dataset given by name (``test_split`` for held-out)."""
    test_split: Optional[str] = None
    format: str = one_of(*FORMATS)
    """auto, prompt_completion, messages, pairs, hh, ranked or prompt."""
    fields: FieldNames = field(default_factory=FieldNames)
    """Field-name mapping: ``fields.prompt=question fields.chosen=better``."""
    on_error: BadData = BadData.error
    """error or skip (the presets use the run's ``bad_data``) a bad record, such as one whose
    text holds a special token of the policy's tokenizer (``<eos>``) literally."""
    max_records: int = bounded(0, ge=0)
    """Read at most this many records per source (0: all)."""
    seed: int = bounded(0, ge=0)
    """Seed of the train/test hold-out."""


Record = tuple[str, dict[str, Any]]  # (where, fields)


class FileData:
    labeller = None  # real data has no programmatic labeller

    def __init__(self, cfg: FileDataConfig):
        if cfg.format not in FORMATS:
            raise ConfigError(f"data.format={cfg.format!r}: choose one of {', '.join(FORMATS)}.")
        if not (cfg.path or cfg.sft or cfg.comparisons or cfg.prompts):
            raise ConfigError("data=files (data=jsonl) needs a source: data.path=<file> (or data.sft=, data.comparisons=, data.prompts=).")
        if not 0 <= cfg.test_fraction < 1:
            raise ConfigError(f"data.test_fraction={cfg.test_fraction}: use a value in [0, 1).")
        self.cfg = cfg
        self.issues = DataIssues(cfg.on_error)
        self.render: Callable[[list[dict[str, str]], bool], str] = render_plain
        self.special: dict[str, str] = {}  # the bound tokenizer's special tokens -> their role
        self._special_re: re.Pattern[str] | None = None
        self._cache: dict[tuple[str, str], Any] = {}
        self.sources: dict[str, str] = {}
        self._checks: dict[str, Check] = {}
        self._records: dict[tuple[str, str, str], list[Record]] = {}

    # -- the Dataset protocol --------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        return self.issues.skipped

    @property
    def provides(self) -> frozenset[str]:
        """What the configured sources can hold: a format of prompts (with completions)
        has no comparisons, and one of bare prompts no demonstrations either."""
        cfg, parts = self.cfg, {"prompts"}
        if cfg.sft or cfg.format != "prompt":
            parts.add("demonstrations")
        if cfg.comparisons or cfg.format not in ("prompt", "prompt_completion", "messages"):
            parts.add("comparisons")
        return frozenset(parts)

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated word in the data: what a tiny model built from
        config (``policy.model=tiny-gpt2``) tokenizes with. Pretrained models use their own."""
        words: set[str] = set()
        for source in {self.cfg.path, self.cfg.sft, self.cfg.comparisons, self.cfg.prompts} - {None}:
            for split in ("train", "test"):
                parsed = self._parsed(source, split)
                for e in parsed["sft"]:
                    words.update(e.prompt.split(), e.response.split())
                for c in parsed["comparisons"]:
                    words.update(c.prompt.split())
                    for r in c.responses:
                        words.update(r.split())
                for p in parsed["prompts"]:
                    words.update(p.split())
        return sorted(words)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Render chat messages with ``tokenizer``'s chat template (if it has one)."""
        if getattr(tokenizer, "chat_template", None):
            def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

            self.render = render
        else:
            self.render = render_plain
        self.special = special_tokens(tokenizer)
        longest_first = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        self._cache.clear()

    def sft_examples(self, split: str) -> list[Example]:
        return self._parsed(self.cfg.sft or self.cfg.path, split)["sft"]

    def comparisons(self, split: str, sample: Sampler) -> list[Comparison]:
        return self._parsed(self.cfg.comparisons or self.cfg.path, split)["comparisons"]

    def prompts(self, split: str) -> list[str]:
        return self._parsed(self.cfg.prompts or self.cfg.path, split)["prompts"]

    def checks(self, prompt: str) -> Check | None:
        """The reference answer and tests the records gave ``prompt`` (the first record's),
        or None."""
        if prompt not in self._checks:
            for split in ("train", "test"):  # parse every source once (cached)
                self.sft_examples(split), self.comparisons(split, lambda p, n: []), self.prompts(split)
        return self._checks.get(prompt)

    # -- parsing --------------------------------------------------------------------------

    def _parsed(self, source: str | None, split: str) -> dict[str, list]:
        if source is None:
            return {"sft": [], "comparisons": [], "prompts": []}
        key = (source, split)
        if key not in self._cache:
            if split == "test" and (self.cfg.test_path or self.cfg.test_split):
                records = self._read(self.cfg.test_path or source, self.cfg.test_split or self.cfg.split)
            else:
                records = self._split(self._read(source, self.cfg.split), split)
            out: dict[str, list] = {"sft": [], "comparisons": [], "prompts": []}
            usable = 0
            for where, rec in records:
                item = self.parse(where, rec)
                if item is None:
                    continue
                usable += 1
                self.sources.setdefault(item if isinstance(item, str) else item.prompt, where)
                if isinstance(item, Comparison):
                    out["comparisons"].append(item)
                    best = max(range(len(item.scores)), key=lambda i: item.scores[i])
                    out["sft"].append(Example(item.prompt, item.responses[best], source=where))
                elif isinstance(item, Example):
                    out["sft"].append(item)
                out["prompts"].append(item if isinstance(item, str) else item.prompt)
            out["prompts"] = list(dict.fromkeys(out["prompts"]))  # once each, in order
            if records and not usable and (split == "train" or self.cfg.test_path):
                self._nothing_usable(source, split)
            self._cache[key] = out
        return self._cache[key]

    def _nothing_usable(self, source: str, split: str) -> None:
        if split == "test":
            self._unusable(self.cfg.test_path, "no usable record")
        if not (self.cfg.test_path or self.cfg.test_split) and any(self._parsed(source, "test").values()):
            self._unusable(source, "no usable record outside the held-out share (data.test_fraction)")
        self._unusable(source, "no usable record")  # the held-out share's bad records are counted too now

    def _unusable(self, source: str, what: str) -> None:
        """A source that gives nothing to train on: name it, and what bad_data=skip dropped."""
        key = next((f"data.{k}" for k in ("path", "sft", "comparisons", "prompts", "test_path")
                    if getattr(self.cfg, k) == source), "data source")
        dropped = sum(self.issues.counts.values())
        why = (f"bad_data=skip skipped {dropped} bad record(s): {self.issues.summary()}" if dropped
               else "the file is empty or blank" if os.path.isfile(source) else "the dataset is empty")
        raise DataError(f"{key}={source}: {what} ({why}). Point {key} at records in one of the formats of data.format "
                        "(data.fields.<name>=<field> maps field names).")

    def _split(self, records: list[Record], split: str) -> list[Record]:
        if self.cfg.test_fraction == 0 or len(records) < 2:
            return records if split == "train" else []
        n_test = max(1, math.ceil(self.cfg.test_fraction * len(records)))
        order = list(range(len(records)))
        random.Random(self.cfg.seed).shuffle(order)
        chosen = set(order[:n_test]) if split == "test" else set(order[n_test:])
        return [r for i, r in enumerate(records) if i in chosen]

    def _read(self, source: str, split: str) -> list[Record]:
        key = ("records", source, split)
        if key not in self._records:
            out = []
            for record in read_records(source, split, self.issues):
                out.append(record)
                if self.cfg.max_records and len(out) >= self.cfg.max_records:
                    break
            if not out:
                self._unusable(source, "no records")
            self._records[key] = out
        return self._records[key]

    def _get(self, rec: dict[str, Any], name: str) -> Any:
        return rec.get(self._name(name))

    def _name(self, name: str) -> str:
        return getattr(self.cfg.fields, name)

    def detect(self, rec: dict[str, Any]) -> str | None:
        has = lambda n: self._get(rec, n) is not None  # noqa: E731
        if has("chosen") or has("rejected"):
            return "pairs" if has("prompt") else "hh"
        if has("responses"):
            return "ranked"
        if has("messages"):
            return "messages"
        if has("completion") or has("response"):
            return "prompt_completion"
        if has("prompt"):
            return "prompt"
        return None

    def parse(self, where: str, rec: Any) -> Example | Comparison | str | None:
        """One record as an Example, a Comparison or a prompt; None if it is bad and
        skipped (a bad record in error mode raises)."""
        bad = self.issues.bad
        if not isinstance(rec, dict):
            return bad(where, "record is not a JSON object", f"got {type(rec).__name__}")
        surrogate = lone_surrogate(rec)
        if surrogate:
            return bad(where, "lone surrogate in a string", f"{surrogate} is half of a UTF-16 pair, not a character")
        fmt = self.cfg.format if self.cfg.format != "auto" else self.detect(rec)
        if fmt is None:
            return bad(where, "unrecognised record", f"fields {sorted(rec)[:8]}; expected one of the formats in data.format "
                       "(map your field names with data.fields.<name>=<field>)")
        try:
            item = getattr(self, f"_parse_{fmt}")(where, rec)
            check = self._check(rec)
        except _Bad as exc:
            return bad(where, exc.reason, exc.detail)
        if check is not None:
            self._checks.setdefault(item if isinstance(item, str) else item.prompt, check)
        return item

    def _check(self, rec: dict[str, Any]) -> Check | None:
        """The record's check data (``answer``, ``tests``), or None if it has none."""
        answer, tests = self._get(rec, "answer"), self._get(rec, "tests")
        if answer is None and tests is None:
            return None
        aname, tname = self._name("answer"), self._name("tests")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (
                    isinstance(answer, float) and not math.isfinite(answer)):
                raise _Bad(f"field '{aname}' is not a string or a number", f"got {type(answer).__name__}")
            answer = answer if isinstance(answer, str) else str(answer)
        if tests is not None:
            if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
                raise _Bad(f"field '{tname}' is not a list of strings",
                           f"got {type(tests).__name__}" + ("" if not isinstance(tests, list) else " with a non-string item"))
            for i, test in enumerate(tests):
                try:
                    ast.parse(test)
                except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte
                    raise _Bad(f"test in field '{tname}' is not valid Python",
                               f"item {i}: {getattr(exc, 'msg', exc)}") from None
        return Check(answer=answer, tests=tuple(tests or ()))

    def _text(self, rec: dict[str, Any], name: str, what: str = "field") -> str:
        value = self._get(rec, name)
        field_name = self._name(name)
        if value is None:
            raise _Bad(f"missing field '{field_name}'")
        if not isinstance(value, str):
            raise _Bad(f"field '{field_name}' is not a string", f"got {type(value).__name__}")
        if not value.strip():
            raise _Bad(f"empty {what} in field '{field_name}'")
        return self._plain(value, field_name)

    def _plain(self, text: str, field_name: str) -> str:
        """``text``, if it holds none of the tokenizer's special tokens."""
        found = self._special_re.search(text) if self._special_re else None
        if found:
            raise _Bad(f"special token in field '{field_name}'", f"{found.group()!r} is the tokenizer's "
                       f"{self.special[found.group()]}, so it would not be read as text")
        return text

    def _messages(self, rec: dict[str, Any], name: str) -> list[dict[str, str]]:
        value = self._get(rec, name)
        field_name = self._name(name)
        if value is None:
            raise _Bad(f"missing field '{field_name}'")
        if not isinstance(value, list) or not value:
            raise _Bad(f"field '{field_name}' is not a non-empty list of messages")
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _Bad(f"field '{field_name}' has a malformed message", f"message {i} needs string 'role' and 'content'")
            self._plain(m["content"], field_name)
        return value

    def _parse_prompt_completion(self, where: str, rec: dict[str, Any]) -> Example:
        name = "completion" if self._get(rec, "completion") is not None or self._get(rec, "response") is None else "response"
        prompt = self._prompt(rec)
        return Example(prompt, self._text(rec, name, "response"), source=where)

    def _prompt(self, rec: dict[str, Any]) -> str:
        value = self._get(rec, "prompt")
        if isinstance(value, list):  # conversational prompt
            return self.render(self._messages(rec, "prompt"), True)
        return self._text(rec, "prompt", "prompt")

    def _parse_messages(self, where: str, rec: dict[str, Any]) -> Example:
        messages = self._messages(rec, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise _Bad(f"field '{self._name('messages')}' does not end with an assistant reply after a prompt")
        if not messages[-1]["content"].strip():
            raise _Bad(f"empty response in field '{self._name('messages')}'")
        return Example(self.render(messages[:-1], True), messages[-1]["content"], source=where)

    def _response(self, rec: dict[str, Any], name: str) -> str:
        value = self._get(rec, name)
        if isinstance(value, list):  # conversational: the assistant turn(s) after the prompt
            turns = self._messages(rec, name)
            text = turns[-1]["content"]
            if not text.strip():
                raise _Bad(f"empty response in field '{self._name(name)}'")
            return text
        return self._text(rec, name, "response")

    def _parse_pairs(self, where: str, rec: dict[str, Any]) -> Comparison:
        prompt = self._prompt(rec)
        return Comparison(prompt, (self._response(rec, "chosen"), self._response(rec, "rejected")), (1.0, 0.0), source=where)

    def _parse_hh(self, where: str, rec: dict[str, Any]) -> Comparison:
        chosen, rejected = self._text(rec, "chosen", "transcript"), self._text(rec, "rejected", "transcript")
        (p1, c), (p2, r) = split_transcript(chosen), split_transcript(rejected)
        if p1 is None or p2 is None:
            raise _Bad(f"transcript without an '{ASSISTANT.strip()}' turn")
        if p1 != p2:
            raise _Bad("chosen and rejected transcripts do not share a prompt")
        if not c.strip() or not r.strip():
            raise _Bad("empty response in an HH transcript")
        return Comparison(p1, (c, r), (1.0, 0.0), source=where)

    def _parse_ranked(self, where: str, rec: dict[str, Any]) -> Comparison:
        prompt = self._prompt(rec)
        responses = self._get(rec, "responses")
        name = self._name("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise _Bad(f"field '{name}' is not a list of at least 2 responses")
        for i, x in enumerate(responses):
            if not isinstance(x, str):
                raise _Bad(f"field '{name}' has a non-string response", f"item {i}")
            if not x.strip():
                raise _Bad(f"empty response in field '{name}'", f"item {i}")
            self._plain(x, name)
        ranking, scores = self._get(rec, "ranking"), self._get(rec, "scores")
        if ranking is None and scores is None:
            raise _Bad(f"missing field '{self._name('ranking')}' (or '{self._name('scores')}')")
        values = ranking if ranking is not None else scores
        vname = self._name("ranking" if ranking is not None else "scores")
        if not isinstance(values, list) or len(values) != len(responses):
            raise _Bad(f"field '{vname}' does not have one number per response")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise _Bad(f"field '{vname}' holds something other than finite numbers")
        if len(set(values)) < 2:
            raise _Bad(f"field '{vname}' ties every response", "no preference to learn from")
        higher_better = tuple(float(-v if ranking is not None else v) for v in values)
        return Comparison(prompt, tuple(responses), higher_better, source=where)

    def _parse_prompt(self, where: str, rec: dict[str, Any]) -> str:
        return self._prompt(rec)


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


def lone_surrogate(value: Any) -> str | None:
    """A lone surrogate (``"\\ud800"``: JSON's escapes allow one, UTF-8 and every tokenizer
    refuse it) in a decoded record's strings, keys included, escaped; else None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                return ascii(v[exc.start])
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return None


def render_plain(messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """Chat turns as Anthropic HH writes them (for tokenizers without a chat template)."""
    names = {"user": HUMAN, "assistant": ASSISTANT, "system": "\n\nSystem:"}
    text = "".join(f"{names.get(m['role'], chr(10) * 2 + m['role'].title() + ':')} {m['content']}" for m in messages)
    return text + (ASSISTANT if generation_prompt else "")


def split_transcript(text: str) -> tuple[str | None, str]:
    """An HH transcript -> (prompt up to and including the last "Assistant:", reply)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None, ""
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:].lstrip(" ")


def read_records(source: str, split: str, issues: DataIssues) -> Iterator[Record]:
    """(where, record) from a .jsonl/.json/.parquet file, a ``datasets`` directory, or a
    Hugging Face dataset name. A malformed JSON line is a bad record; an unreadable file
    is an error."""
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext in (".jsonl", ".ndjson"):
            yield from _read_jsonl(source, issues)
        elif ext == ".json":
            yield from _read_json(source)
        elif ext == ".parquet":
            yield from _read_parquet(source)
        else:
            raise DataError(f"{source}: unknown file type {ext!r}; use .jsonl, .json or .parquet.")
    elif os.path.splitext(source)[1].lower() in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise DataError(f"{source}: no such file (relative paths are from {os.getcwd()}).")
    else:
        yield from _read_hf(source, split)


def _read_jsonl(path: str, issues: DataIssues) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                issues.bad(where, "line is not UTF-8", str(exc))
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except (ValueError, RecursionError) as exc:
                issues.bad(where, "malformed JSON", str(exc)[:120])


def _read_json(path: str) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). A .json file holds one array of records; use .jsonl for one record per line.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (or {{\"data\": [...]}}), got {type(data).__name__}.")
    for i, rec in enumerate(data):
        yield f"{path}[{i}]", rec


def _read_parquet(path: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'rlhfkit[data]'.") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc}).") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path} row {i}", rec


def _read_hf(name: str, split: str) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data source {name!r} is not a file, and loading Hugging Face datasets needs the datasets "
                        "package: pip install 'rlhfkit[data]' (or give a local .jsonl/.json/.parquet path).") from None
    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(
                os.path.join(name, "dataset_info.json")):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
                        "Without network access, download it elsewhere and pass a local file or directory.") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}] row {i}", rec


@hookimpl
def rlhfkit_register_datasets(register):
    register("files", FileData, FileDataConfig)
