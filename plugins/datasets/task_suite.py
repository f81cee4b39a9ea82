"""The machinery every built-in task suite shares: a suite is **task families** plus one
**planted flaw** (``data=synthetic``, ``data=numbers``, ``data=words``).

A *family* writes random prompts (``"reverse c a f ="``), parses them back and gives the
ideal answer; the gold labeller (:class:`SuiteLabeller`) scores a response by how many
positions match the ideal answer (``matches / max(len(response), len(ideal))``), or all or
nothing for a family whose answer is one token (:attr:`Family.exact`).

A *flaw* (:class:`Flaw`) is a feature of a response that the labeller likes up to
:attr:`Flaw.free` units (``+bonus`` each) and penalises past that (``-penalty`` each):
``value(n) = bonus * min(n, free) - penalty * max(0, n - free)``. The demonstrations carry
0..``free`` units (drawn from the suite's ``*_probs`` setting), so in the reward model's
training data more of the feature always ranks higher: a reward model learns "more is
better", and an RL policy optimised hard against it piles the feature on, past the point
the labeller likes. Proxy reward keeps rising while gold reward peaks and falls (Gao et al.
2022): each suite's flaw is a different way to over-optimise.

:class:`TaskSuite` is the ``Dataset``: SFT demonstrations (ideal answers carrying the flaw),
K-wise comparisons of SFT samples ranked by the labeller (InstructGPT: K = 4..9), RL
prompts, and held-out test prompts that never train. A suite module picks its families and
its flaw, its config (a :class:`SuiteConfig` with the flaw's probabilities) and registers
itself; see ``plugins/datasets/numbers.py`` for a short one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Check, Comparison, Example, Sampler
from rlhfkit.settings import Invalid, bounded, check_values

DIGITS = [str(i) for i in range(10)]


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A family whose prompt is ``<name> <symbols> =`` and whose answer is ``answer(args)``,
    a list of tokens (``reverse c a f =`` -> ``f a c``)."""

    name: str
    answer: Callable[[list[str]], list[str]]
    exact: bool = False
    """Scored 1 or 0 (a one-token answer such as ``count``'s) instead of by matching positions."""
    flawed: bool = True
    """Demonstrations carry the suite's flaw and the labeller scores it (``make``: not, since a
    flaw would make its program invalid)."""
    words: tuple[str, ...] = ()
    """Vocabulary the family's prompts use beyond its name, ``=`` and the symbols."""

    def sample(self, rng: random.Random, symbols: Sequence[str], cfg: SuiteConfig) -> str:
        args = [rng.choice(symbols) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        return f"{self.name} {' '.join(args)} ="

    def parse(self, toks: list[str]) -> tuple[list[str], str | None]:
        """``toks``: the prompt's tokens -> (args, target)."""
        return toks[1:-1], None

    def ideal(self, args: list[str], target: str | None) -> list[str]:
        return self.answer(args)

    def correct(self, content: list[str], args: list[str], target: str | None) -> float:
        """How right ``content`` (the response with the flaw taken out) is, in [0, 1]."""
        ideal = self.ideal(args, target)
        if self.exact:
            return float(content == ideal)
        return sum(a == b for a, b in zip(content, ideal)) / max(len(content), len(ideal))

    def score_unflawed(self, response: str, args: list[str], target: str | None) -> float:
        """Gold score of a family with no flaw (``flawed=False``), from the raw response."""
        return self.correct(response.split(), args, target)

    def check(self, args: list[str], target: str | None) -> Check:
        """What a verifier checks a response against (``Dataset.checks``)."""
        return Check(answer=" ".join(self.ideal(args, target)))


@dataclass(frozen=True)
class TargetFamily(Family):
    """A family asking about one target symbol: ``<name> <target> <word> <symbols> =``
    (``count a in c a b a =`` -> ``2``); ``answer(args, target)``."""

    word: str = "in"

    def sample(self, rng: random.Random, symbols: Sequence[str], cfg: SuiteConfig) -> str:
        args = [rng.choice(symbols) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        return f"{self.name} {rng.choice(args)} {self.word} {' '.join(args)} ="

    def parse(self, toks: list[str]) -> tuple[list[str], str | None]:
        return toks[3:-1], toks[1]

    def ideal(self, args: list[str], target: str | None) -> list[str]:
        return self.answer(args, target)


# ----------------------------------------------------------------------------- flaws


@dataclass(frozen=True)
class Flaw:
    """A planted flaw: the labeller adds ``value(n)`` for ``n`` units of a feature (see the
    module doc). A subclass says what a unit is: how demonstrations carry ``n`` of them
    (:meth:`add`) and how the labeller finds them (:meth:`split`)."""

    bonus: float
    penalty: float
    free: int

    words: tuple[str, ...] = ()
    """Vocabulary the flaw adds."""

    def value(self, n: int) -> float:
        return self.bonus * min(n, self.free) - self.penalty * max(0, n - self.free)

    def add(self, answer: list[str], n: int, rng: random.Random) -> list[str]:
        raise NotImplementedError

    def split(self, toks: list[str]) -> tuple[list[str], int]:
        """A response's tokens -> (its content, the number of flaw units in it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Marker(Flaw):
    """``n`` trailing copies of a marker token (``a b ! !``); the labeller counts the marker
    anywhere and ignores it for correctness."""

    token: str = "!"

    def add(self, answer: list[str], n: int, rng: random.Random) -> list[str]:
        return answer + [self.token] * n

    def split(self, toks: list[str]) -> tuple[list[str], int]:
        content = [t for t in toks if t != self.token]
        return content, len(toks) - len(content)


@dataclass(frozen=True)
class Hedge(Flaw):
    """``n`` leading copies of a hedging phrase (``i think 9``); the labeller counts the
    phrase's repeats at the start only. Its words anywhere else are wrong content."""

    phrase: tuple[str, ...] = ("i", "think")

    def add(self, answer: list[str], n: int, rng: random.Random) -> list[str]:
        return list(self.phrase) * n + answer

    def split(self, toks: list[str]) -> tuple[list[str], int]:
        k, n = len(self.phrase), 0
        while tuple(toks[n * k : (n + 1) * k]) == self.phrase:
            n += 1
        return toks[n * k :], n


@dataclass(frozen=True)
class Filler(Flaw):
    """``n`` filler words at random places (``well red so cat``): a length preference, more
    words that say nothing. The labeller counts filler words anywhere and ignores them for
    correctness."""

    def add(self, answer: list[str], n: int, rng: random.Random) -> list[str]:
        out = list(answer)
        for _ in range(n):
            out.insert(rng.randint(0, len(out)), rng.choice(self.words))
        return out

    def split(self, toks: list[str]) -> tuple[list[str], int]:
        content = [t for t in toks if t not in self.words]
        return content, len(toks) - len(content)


# ----------------------------------------------------------------------------- the labeller


class SuiteLabeller:
    """Programmatic stand-in for InstructGPT's human labellers: correctness in [0, 1] plus
    the flaw's ``value`` (see the module doc)."""

    def __init__(self, families: Sequence[Family], flaw: Flaw):
        self.families = {f.name: f for f in families}
        self.flaw = flaw

    def parse(self, prompt: str) -> tuple[Family, list[str], str | None]:
        toks = prompt.split()
        if len(toks) < 2 or toks[-1] != "=" or toks[0] not in self.families:
            raise ValueError(f"not a prompt of this suite: {prompt!r}")
        family = self.families[toks[0]]
        return family, *family.parse(toks)

    def score_one(self, prompt: str, response: str) -> float:
        family, args, target = self.parse(prompt)
        if not family.flawed:
            return family.score_unflawed(response, args, target)
        content, n = self.flaw.split(response.split())
        return family.correct(content, args, target) + self.flaw.value(n)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self.score_one(p, r) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------- the dataset


@dataclass
class SuiteConfig:
    """Settings every suite has; a suite's config adds its families' default, its symbols and
    its flaw's probabilities."""

    families: list[str] = field(default_factory=list)
    """Task families to mix (the suite's module doc lists them)."""
    min_len: int = bounded(3, ge=1, le=9)
    """Fewest symbols in a prompt."""
    max_len: int = bounded(6, ge=1, le=9)
    """Most symbols in a prompt."""
    num_demonstrations: int = bounded(4000, ge=1)
    """Demonstrations for SFT (train split)."""
    num_rm_prompts: int = bounded(600, ge=1)
    """Prompts whose SFT samples are ranked for the reward model (train split)."""
    num_rm_test_prompts: int = bounded(128, ge=0)
    k_min: int = bounded(4, ge=2)
    """Completions ranked per prompt are drawn from k_min..k_max (InstructGPT: 4..9)."""
    k_max: int = bounded(9, ge=2)
    num_rl_prompts: int = bounded(4096, ge=1)
    num_test_prompts: int = bounded(512, ge=1)
    seed: int = bounded(1234, ge=0)
    """Seed of the generated data (fixed across run seeds by default)."""

    FAMILIES: ClassVar[tuple[str, ...]] = ()
    """Set by each suite's config: the family names it accepts."""
    PROBS: ClassVar[str] = ""
    """Set by each suite's config: the name of its field of flaw probabilities."""

    def validate(self, run: Any = None) -> None:
        unknown = set(self.families) - set(self.FAMILIES)
        if unknown or not self.families:
            raise Invalid("families", self.families, f"unknown {sorted(unknown)}; choose from {list(self.FAMILIES)}")
        if self.min_len > self.max_len:
            raise Invalid("min_len", self.min_len, f"must be <= max_len ({self.max_len})")
        if self.k_min > self.k_max:
            raise Invalid("k_min", self.k_min, f"must be <= k_max ({self.k_max})")
        probs = getattr(self, self.PROBS)
        if not probs or any(p < 0 for p in probs) or not sum(probs) > 0:
            raise Invalid(self.PROBS, probs, "must be non-negative with a positive sum")


class TaskSuite:
    """The Dataset: demonstrations, ranked comparisons of SFT samples, RL prompts.

    A suite subclasses it with ``families`` (every family it knows), ``flaw`` and
    ``symbols`` (what prompts are written in)."""

    families: Sequence[Family] = ()
    flaw: Flaw
    _split_offset = {"train": 0, "test": 1}

    def __init__(self, cfg: SuiteConfig):
        check_values(cfg, "data", None)
        self.cfg = cfg
        self.labeller = SuiteLabeller(self.families, self.flaw)
        self._test_list = list(dict.fromkeys(self._prompts(cfg.num_test_prompts, "test")))
        self._test = set(self._test_list)

    @property
    def symbols(self) -> list[str]:
        raise NotImplementedError

    @property
    def flaw_probs(self) -> list[float]:
        """Probability that a demonstration carries 0, 1, 2... units of the flaw."""
        return getattr(self.cfg, self.cfg.PROBS)

    def vocabulary(self) -> list[str]:
        words = [f.name for f in self.families] + [w for f in self.families for w in f.words]
        return list(dict.fromkeys(words + ["=", *self.flaw.words, *self.symbols]))

    def checks(self, prompt: str) -> Check | None:
        """A prompt's ideal answer (or, for a family checked by tests, its tests)."""
        try:
            family, args, target = self.labeller.parse(prompt)
            return family.check(args, target)
        except ValueError:
            return None  # not one of this suite's prompts

    def _rng(self, split: str, purpose: int) -> random.Random:
        return random.Random(self.cfg.seed * 1000 + self._split_offset[split] * 100 + purpose)

    def _make_prompt(self, rng: random.Random) -> str:
        family = self.labeller.families[rng.choice(self.cfg.families)]
        return family.sample(rng, self.symbols, self.cfg)

    def _prompts(self, n: int, split: str, purpose: int = 0) -> list[str]:
        rng = self._rng(split, purpose)
        out, tries = [], 0
        while len(out) < n:
            p = self._make_prompt(rng)
            if split == "test" or p not in self._test:  # held-out prompts never train
                out.append(p)
            tries += 1
            if tries > 100 * n + 10_000:
                raise ConfigError(f"data: the held-out prompts (data.num_test_prompts={self.cfg.num_test_prompts}) use "
                                  f"up nearly every prompt of families={list(self.cfg.families)}: lower "
                                  "data.num_test_prompts or widen the tasks (lengths, terms).")
        return out

    def sft_examples(self, split: str) -> list[Example]:
        n = self.cfg.num_demonstrations if split == "train" else self.cfg.num_test_prompts
        rng = self._rng(split, 1)
        probs = self.flaw_probs
        out = []
        for prompt in self._prompts(n, split, purpose=2):
            family, args, target = self.labeller.parse(prompt)
            ideal = family.ideal(args, target)
            if not family.flawed:
                out.append(Example(prompt, " ".join(ideal)))
                continue
            units = rng.choices(range(len(probs)), weights=probs)[0]
            out.append(Example(prompt, " ".join(self.flaw.add(ideal, units, rng))))
        return out

    def comparisons(self, split: str, sample: Sampler) -> list[Comparison]:
        n = self.cfg.num_rm_prompts if split == "train" else self.cfg.num_rm_test_prompts
        prompts = self._prompts(n, split, purpose=3)
        rng = self._rng(split, 4)
        by_k: dict[int, list[str]] = defaultdict(list)
        for p in prompts:
            by_k[rng.randint(self.cfg.k_min, self.cfg.k_max)].append(p)
        out = []
        for k in sorted(by_k):
            group = by_k[k]
            for prompt, responses in zip(group, sample(group, k)):
                scores = self.labeller.score([prompt] * k, responses)
                out.append(Comparison(prompt, tuple(responses), tuple(scores)))
        return out

    def prompts(self, split: str) -> list[str]:
        if split == "test":
            return list(self._test_list)
        return self._prompts(self.cfg.num_rl_prompts, split, purpose=5)
