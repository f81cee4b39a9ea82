"""The final evaluation: each policy's samples, and the RL-vs-SFT win rate, on held-out
prompts."""

import math

import pytest

from rlhfkit.cli import setup
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import Run
from rlhfkit.rlhf.evaluation import format_table, paired_standard_error

from ..helpers import SMOKE, compose


@pytest.fixture
def run(tmp_path):
    plugins, registry = setup()
    return Run(compose(SMOKE + ["logger=[]"]), registry, plugins, str(tmp_path / "run"))


def test_win_rate_compares_independent_draws(run, policy_dir):
    """A toy case: the "RL" policy is the SFT policy itself. Independent draws of one policy
    tie only where two different samples happen to score the same, and win half the rest;
    draws that share their uniforms give the same responses, so every prompt ties."""
    run.products["sft"] = run.products["rl"] = policy_dir
    table = run.final_evaluation()
    assert table["tie_rate"] < 0.8
    assert 0.25 < table["win_rate"] < 0.75
    # one policy against itself: no real improvement, and the evaluation says how far chance moves it
    assert 0 < table["gold_improvement_se"] < 0.2 and abs(table["gold_improvement"]) < 3 * table["gold_improvement_se"]
    assert f"(standard error {table['gold_improvement_se']:.3f})" in format_table(table)
    ctx = run.context("eval")
    sft = ctx.load_policy("sft")
    ctx.data.bind(sft)
    prompts = ctx.eval_prompts(sft.tokenizer)
    first, again = (ctx.evaluate(sft, sft, None, prompts, stream="sft") for _ in range(2))
    assert first.responses == again.responses  # each policy's own stream is fixed: reproducible
    assert first.metrics == table["policies"]["sft"]
    as_rl = ctx.evaluate(sft, sft, None, prompts, stream="rl")
    assert as_rl.metrics == table["policies"]["rl"] and as_rl.responses != first.responses


def test_rl_refuses_top_k_and_top_p(tmp_path):
    """RL scores responses under the full softmax: a truncated sampler is refused up front
    (a run without the rl stage may still use it to sample RM comparisons)."""
    plugins, registry = setup()
    for override in ("rollout.top_k=5", "rollout.top_p=0.9"):
        with pytest.raises(ConfigError, match="top_k=0 rollout.top_p=1.0"):
            Run(compose(SMOKE + ["logger=[]", override]), registry, plugins, str(tmp_path / "run"))
    Run(compose(SMOKE + ["logger=[]", "stages=[sft,rm]", "rollout.top_k=5"]), registry, plugins, str(tmp_path / "rm"))


def test_several_samples_per_prompt(tmp_path, policy_dir):
    """eval.samples_per_prompt=k: k independent responses to each held-out prompt, adjacent;
    gold is the mean over all of them, and the table says so."""
    plugins, registry = setup()
    one = Run(compose(SMOKE + ["logger=[]"]), registry, plugins, str(tmp_path / "one"))
    three = Run(compose(SMOKE + ["logger=[]", "eval.samples_per_prompt=3"]), registry, plugins, str(tmp_path / "three"))
    results = []
    for run in (one, three):
        run.products["sft"] = policy_dir
        ctx = run.context("eval")
        sft = ctx.load_policy("sft")
        ctx.data.bind(sft)
        prompts = ctx.eval_prompts(sft.tokenizer)
        results.append(ctx.evaluate(sft, sft, None, prompts, stream="sft"))
    single, triple = results
    n = len(single.prompts)
    assert len(triple.responses) == 3 * n and triple.prompts == [p for p in single.prompts for _ in range(3)]
    assert triple.responses[:3] != [triple.responses[0]] * 3 or triple.responses[3:6] != [triple.responses[3]] * 3
    assert triple.metrics["gold"] == pytest.approx(sum(triple.gold) / (3 * n))
    assert triple.metrics["gold"] != single.metrics["gold"]
    three.products["rl"] = policy_dir
    table = three.final_evaluation()
    assert table["samples_per_prompt"] == 3 and table["policies"]["sft"] == triple.metrics


def test_samples_per_prompt_is_checked_before_any_work(tmp_path):
    plugins, registry = setup()
    with pytest.raises(ConfigError, match="eval.samples_per_prompt=0: must be >= 1"):
        Run(compose(SMOKE + ["logger=[]", "eval.samples_per_prompt=0"]), registry, plugins, str(tmp_path / "run"))


def test_the_gold_improvements_standard_error_pairs_the_samples_of_each_prompt():
    gold, base = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    # one sample per prompt: differences 1, 0, 0, 1 -> stdev 0.577 over sqrt(4)
    assert paired_standard_error(gold, base) == pytest.approx(0.5773503 / 2)
    # two samples per prompt: per-prompt differences of means 0.5 and 0.5 -> no spread
    assert paired_standard_error(gold, base, samples_per_prompt=2) == 0.0
    assert math.isnan(paired_standard_error([1.0], [0.0]))


def test_one_prompt_gives_no_standard_error_rather_than_nan_in_eval_json():
    from rlhfkit.rlhf.evaluation import EvalResult, versus

    one = EvalResult({"gold": 1.0}, ["p"], ["a"], [1.0]), EvalResult({"gold": 0.0}, ["p"], ["b"], [0.0])
    vs = versus(*one)
    assert vs["gold_improvement"] == 1.0 and "gold_improvement_se" not in vs
    two = EvalResult({"gold": 0.5}, ["p", "q"], ["a", "b"], [1.0, 0.0]), EvalResult({"gold": 0.0}, ["p", "q"], ["c", "d"], [0.0, 0.0])
    assert versus(*two)["gold_improvement_se"] == pytest.approx(0.5)
