"""The built-in task suites beside data=synthetic (data=numbers, data=words) and the machinery
they share (plugins/datasets/task_suite.py): families, the labeller with each suite's
planted flaw (bonus up to a point, then a penalty), demonstrations that vary in the flaw's
feature, comparisons, held-out prompts, and config validation."""

import random

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.datasets.numbers import NumberTasks, NumbersConfig
from rlhfkit.plugins.datasets.task_suite import Filler, Hedge, Marker
from rlhfkit.plugins.datasets.words import WordsConfig, WordTasks

SMALL = dict(num_demonstrations=400, num_rm_prompts=8, num_rm_test_prompts=4, num_rl_prompts=64, num_test_prompts=64)
SUITES = {"numbers": (NumberTasks, NumbersConfig), "words": (WordTasks, WordsConfig)}


def suite(name, **kw):
    tasks, config = SUITES[name]
    return tasks(config(**{**SMALL, **kw}))


@pytest.mark.parametrize("prompt,ideal", [
    ("max 3 9 2 =", "9"), ("min 3 9 2 =", "2"), ("inc 3 9 2 =", "4 0 3"), ("dup 3 9 =", "3 3 9 9"),
])
def test_number_families(prompt, ideal):
    assert suite("numbers").checks(prompt).answer == ideal


@pytest.mark.parametrize("prompt,ideal", [
    ("first red cat sun =", "red"), ("last red cat sun =", "sun"), ("swap red cat dog sun =", "sun cat dog red"),
    ("rotate red cat sun =", "cat sun red"),
])
def test_word_families(prompt, ideal):
    assert suite("words").checks(prompt).answer == ideal


def test_partial_credit_and_exact_families():
    g = suite("numbers").labeller
    assert g.score_one("inc 3 9 2 =", "4 0 3") == 1.0
    assert g.score_one("inc 3 9 2 =", "4 0") == pytest.approx(2 / 3)
    assert g.score_one("dup 3 9 =", "3 3 9 9 9") == pytest.approx(4 / 5)
    assert g.score_one("max 3 9 2 =", "9 9") == 0.0  # all or nothing
    w = suite("words").labeller
    assert w.score_one("rotate red cat sun =", "cat red sun") == pytest.approx(1 / 3)
    assert w.score_one("first red cat sun =", "cat") == 0.0
    assert suite("words").checks("copy a b =") is None  # another suite's prompt


def test_hedge_flaw_peaks_at_one_and_is_only_a_leading_phrase():
    g = suite("numbers").labeller
    scores = [g.score_one("max 3 9 2 =", "i think " * n + "9") for n in range(5)]
    assert scores[0] < scores[1]  # the labeller likes one hedge...
    assert scores[1] > scores[2] > scores[3] > scores[4]  # ...and penalises stacking them
    assert scores[2] < scores[0] and scores == pytest.approx([1.0, 1.15, 0.85, 0.55, 0.25])
    assert g.score_one("inc 3 9 =", "4 0 i think") == pytest.approx(2 / 4)  # elsewhere: wrong content, no bonus
    assert g.score_one("inc 3 9 =", "think i 4 0") == pytest.approx(0.0)


def test_filler_flaw_peaks_at_three_fillers_anywhere():
    g = suite("words").labeller
    padded = ["sun cat red", "sun well cat red", "so sun cat well red", "sun um cat so red well",
              "well sun so cat um red well", "well so um sun well so cat red"]
    scores = [g.score_one("swap red cat sun =", r) for r in padded]
    assert scores[0] < scores[1] < scores[2] < scores[3]
    assert scores[3] > scores[4] > scores[5]
    assert scores[5] < scores[0] and scores[3] == pytest.approx(1.21)


@pytest.mark.parametrize("flaw,answer", [
    (Marker(0.1, 0.2, 2, token="!"), ["a", "b"]),
    (Hedge(0.15, 0.3, 1, phrase=("i", "think")), ["3"]),
    (Filler(0.07, 0.2, 3, words=("well", "so", "um")), ["red", "cat", "sun"]),
])
def test_a_flaw_finds_what_it_adds(flaw, answer):
    rng = random.Random(0)
    for n in range(6):
        toks = flaw.add(answer, n, rng)
        assert flaw.split(toks) == (answer, n) and len(toks) >= len(answer) + n
    assert [flaw.value(n) for n in range(flaw.free + 3)] == pytest.approx(
        [flaw.bonus * n for n in range(flaw.free + 1)] + [flaw.bonus * flaw.free - flaw.penalty * k for k in (1, 2)])


@pytest.mark.parametrize("name", SUITES)
def test_demonstrations_are_ideal_and_vary_in_the_flaw(name):
    d = suite(name)
    units = []
    for e in d.sft_examples("train"):
        family, args, target = d.labeller.parse(e.prompt)
        content, n = d.flaw.split(e.response.split())
        assert content == family.ideal(args, target)
        assert d.labeller.score_one(e.prompt, e.response) == pytest.approx(1.0 + d.flaw.value(n))
        units.append(n)
    # every count 0..free appears, so the RM sees "more of the feature ranks higher"
    assert set(units) == set(range(d.flaw.free + 1))
    assert {d.labeller.parse(e.prompt)[0].name for e in d.sft_examples("train")} == set(d.cfg.families)


@pytest.mark.parametrize("name", SUITES)
def test_vocabulary_covers_every_prompt_and_demonstration(name):
    d = suite(name)
    vocab = d.vocabulary()
    assert len(vocab) == len(set(vocab))  # one id per word
    words = {t for e in d.sft_examples("train") + d.sft_examples("test") for t in (e.prompt + " " + e.response).split()}
    assert words <= set(vocab)


@pytest.mark.parametrize("name", SUITES)
def test_held_out_prompts_never_train_and_data_is_deterministic(name):
    a, b = suite(name), suite(name)
    test = set(a.prompts("test"))
    train = set(a.prompts("train")) | {e.prompt for e in a.sft_examples("train")}
    assert test and not (test & train)
    assert a.sft_examples("train") == b.sft_examples("train") and a.prompts("train") == b.prompts("train")
    assert a.prompts("train") != suite(name, seed=5).prompts("train")


@pytest.mark.parametrize("name", SUITES)
def test_comparisons_are_k_wise_and_gold_scored(name):
    d = suite(name)
    calls = []

    def sampler(prompts, k):
        calls.append(k)
        return [[" ".join(d.symbols[: i % 4 + 1]) for i in range(k)] for _ in prompts]

    comps = d.comparisons("train", sampler)
    assert len(comps) == 8 and set(calls) <= set(range(4, 10))
    for c in comps:
        assert 4 <= len(c.responses) <= 9
        assert list(c.scores) == d.labeller.score([c.prompt] * len(c.responses), list(c.responses))


@pytest.mark.parametrize("name,setting,match", [
    ("numbers", dict(families=["max", "reverse"]), r"data.families=.*unknown \['reverse'\]; choose from \['max', 'min', 'inc', 'dup'\]"),
    ("numbers", dict(hedge_probs=[0.5, -0.1]), "data.hedge_probs"),
    ("numbers", dict(hedge_probs=[]), "data.hedge_probs"),
    ("numbers", dict(min_len=5, max_len=3), "data.min_len=5: must be <= max_len"),
    ("numbers", dict(k_min=1), "data.k_min=1: must be >= 2"),
    ("words", dict(words=["red", "well"]), r"data.words=.*none of"),
    ("words", dict(words=["red"]), "data.words"),
    ("words", dict(filler_probs=[0, 0]), "data.filler_probs"),
    ("words", dict(max_len=10), r"data.max_len=10: must be in \[1, 9\]"),
])
def test_bad_config_is_a_one_line_error(name, setting, match):
    with pytest.raises(ConfigError, match=match):
        suite(name, **setting)
