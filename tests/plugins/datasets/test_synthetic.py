import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.datasets.synthetic import GoldLabeller, SyntheticConfig, SyntheticTasks, ideal_response, parse_prompt


def test_ideal_responses():
    assert ideal_response(*parse_prompt("reverse c a f =")) == ["f", "a", "c"]
    assert ideal_response(*parse_prompt("sort c a f =")) == ["a", "c", "f"]
    assert ideal_response(*parse_prompt("copy c a f =")) == ["c", "a", "f"]
    assert ideal_response(*parse_prompt("count a in c a b a =")) == ["2"]


def test_labeller_scores_partial_credit():
    g = GoldLabeller()
    assert g.score_one("reverse c a f =", "f a c") == 1.0
    assert g.score_one("reverse c a f =", "f a") == pytest.approx(2 / 3)
    assert g.score_one("reverse c a f =", "f a c c") == pytest.approx(3 / 4)
    assert g.score_one("count a in c a b a =", "3") == 0.0


def test_planted_marker_flaw_peaks_at_two():
    g = GoldLabeller()
    scores = [g.score_one("copy a b =", "a b" + " !" * n) for n in range(6)]
    assert scores[0] < scores[1] < scores[2]  # labellers like a little politeness...
    assert scores[2] > scores[3] > scores[4] > scores[5]  # ...and penalise piling it on
    assert scores[5] < scores[0]


def test_test_prompts_never_train(synthetic):
    test = set(synthetic.prompts("test"))
    train = set(synthetic.prompts("train")) | {e.prompt for e in synthetic.sft_examples("train")}
    assert test and not (test & train)


def test_demonstrations_are_ideal_with_markers(synthetic):
    g = synthetic.labeller
    for e in synthetic.sft_examples("train")[:50]:
        content = [t for t in e.response.split() if t != "!"]
        assert content == ideal_response(*parse_prompt(e.prompt))
        assert g.score_one(e.prompt, e.response) >= 1.0


def test_comparisons_have_k_between_4_and_9_and_gold_scores(synthetic):
    calls = []

    def sampler(prompts, n):
        calls.append(n)
        return [[" ".join(["a"] * (i + 1)) for i in range(n)] for _ in prompts]

    comps = synthetic.comparisons("train", sampler)
    assert len(comps) == 8
    assert all(4 <= len(c.responses) <= 9 for c in comps) and set(calls) <= set(range(4, 10))
    for c in comps:
        assert list(c.scores) == synthetic.labeller.score([c.prompt] * len(c.responses), list(c.responses))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="families"):
        SyntheticTasks(SyntheticConfig(families=["copy", "translate"]))
    with pytest.raises(ConfigError, match="k_min"):
        SyntheticTasks(SyntheticConfig(k_min=1))


def test_data_is_deterministic():
    a, b = SyntheticTasks(SyntheticConfig()), SyntheticTasks(SyntheticConfig())
    assert a.prompts("train")[:20] == b.prompts("train")[:20]
    assert a.sft_examples("train")[:20] == b.sft_examples("train")[:20]
