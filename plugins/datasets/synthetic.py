"""``data=synthetic``: the built-in instruction task suite and its programmatic labeller.

Task families (``copy``, ``reverse``, ``sort``, ``count``) over a small alphabet::

    prompt:   "reverse c a f ="        ideal response: "f a c"
    prompt:   "count a in c a b a ="   ideal response: "2"

The gold labeller scores a response by how many positions match the ideal answer
(``matches / max(len(response), len(ideal))``; exact match for ``count``), ignoring the
politeness marker ``!``.

**Planted flaw** (for studying over-optimisation, Gao et al. 2022): the labeller likes up to
two trailing ``!`` markers (+0.1 each) and penalises every one past two (-0.2 each). The
demonstrations carry 0, 1 or 2 markers, so in the reward model's training data more
markers always rank higher; a reward model learns "more ``!`` is better" and an RL policy
optimised hard against it (no KL penalty) spams markers: proxy reward keeps rising while
gold reward peaks and falls.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhfkit import hookimpl
from rlhfkit.interfaces import Comparison, Example, Sampler
from rlhfkit.settings import Invalid, bounded, check_values

FAMILIES = ("copy", "reverse", "sort", "count")
MARKER = "!"


@dataclass
class SyntheticConfig:
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    """Task families to mix: any of copy, reverse, sort, count."""
    alphabet: str = "abcdefgh"
    """Symbols the tasks are written in."""
    min_len: int = bounded(3, ge=1, le=9)
    max_len: int = bounded(6, ge=1, le=9)
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
    marker_probs: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])
    """Probability that a demonstration ends with 0, 1, 2... politeness markers."""
    seed: int = bounded(1234, ge=0)
    """Seed of the generated data (fixed across run seeds by default)."""

    def validate(self, run: Any = None) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise Invalid("families", self.families, f"unknown {sorted(unknown)}; choose from {list(FAMILIES)}")
        if self.min_len > self.max_len:
            raise Invalid("min_len", self.min_len, f"must be <= max_len ({self.max_len})")
        if self.k_min > self.k_max:
            raise Invalid("k_min", self.k_min, f"must be <= k_max ({self.k_max})")
        if any(p < 0 for p in self.marker_probs) or not sum(self.marker_probs) > 0:
            raise Invalid("marker_probs", self.marker_probs, "must be non-negative with a positive sum")


def ideal_response(family: str, args: list[str], target: str | None = None) -> list[str]:
    if family == "copy":
        return list(args)
    if family == "reverse":
        return list(reversed(args))
    if family == "sort":
        return sorted(args)
    if family == "count":
        return [str(args.count(target))]
    raise ValueError(family)


def parse_prompt(prompt: str) -> tuple[str, list[str], str | None]:
    toks = prompt.split()
    if not toks or toks[-1] != "=":
        raise ValueError(f"not a synthetic prompt: {prompt!r}")
    family = toks[0]
    if family == "count":  # count <t> in a b c =
        return family, toks[3:-1], toks[1]
    return family, toks[1:-1], None


class GoldLabeller:
    """Programmatic stand-in for InstructGPT's human labellers (see the module doc)."""

    marker_bonus = 0.1
    marker_penalty = 0.2
    marker_free = 2

    def score_one(self, prompt: str, response: str) -> float:
        family, args, target = parse_prompt(prompt)
        ideal = ideal_response(family, args, target)
        toks = response.split()
        content = [t for t in toks if t != MARKER]
        markers = len(toks) - len(content)
        if family == "count":
            correct = float(content == ideal)
        else:
            matches = sum(a == b for a, b in zip(content, ideal))
            correct = matches / max(len(content), len(ideal))
        politeness = self.marker_bonus * min(markers, self.marker_free) - self.marker_penalty * max(
            0, markers - self.marker_free
        )
        return correct + politeness

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self.score_one(p, r) for p, r in zip(prompts, responses)]


class SyntheticTasks:
    """The Dataset: demonstrations, ranked comparisons of SFT samples, RL prompts."""

    _split_offset = {"train": 0, "test": 1}

    def __init__(self, cfg: SyntheticConfig):
        check_values(cfg, "data", None)
        self.cfg = cfg
        self.labeller = GoldLabeller()
        self._test_list = list(dict.fromkeys(self._prompts(cfg.num_test_prompts, "test")))
        self._test = set(self._test_list)

    def vocabulary(self) -> list[str]:
        digits = [str(i) for i in range(10)]
        return list(FAMILIES) + ["in", "=", MARKER] + list(self.cfg.alphabet) + digits

    def _rng(self, split: str, purpose: int) -> random.Random:
        return random.Random(self.cfg.seed * 1000 + self._split_offset[split] * 100 + purpose)

    def _make_prompt(self, rng: random.Random) -> str:
        family = rng.choice(self.cfg.families)
        n = rng.randint(self.cfg.min_len, self.cfg.max_len)
        args = [rng.choice(self.cfg.alphabet) for _ in range(n)]
        if family == "count":
            return f"count {rng.choice(args)} in {' '.join(args)} ="
        return f"{family} {' '.join(args)} ="

    def _prompts(self, n: int, split: str, purpose: int = 0) -> list[str]:
        rng = self._rng(split, purpose)
        out = []
        while len(out) < n:
            p = self._make_prompt(rng)
            if split == "test" or p not in self._test:  # held-out prompts never train
                out.append(p)
        return out

    def sft_examples(self, split: str) -> list[Example]:
        n = self.cfg.num_demonstrations if split == "train" else self.cfg.num_test_prompts
        rng = self._rng(split, 1)
        out = []
        for prompt in self._prompts(n, split, purpose=2):
            ideal = ideal_response(*parse_prompt(prompt))
            markers = rng.choices(range(len(self.cfg.marker_probs)), weights=self.cfg.marker_probs)[0]
            out.append(Example(prompt, " ".join(ideal + [MARKER] * markers)))
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


@hookimpl
def rlhfkit_register_datasets(register):
    register("synthetic", SyntheticTasks, SyntheticConfig)
