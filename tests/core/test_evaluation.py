"""The final evaluation: each policy's samples, and the RL-vs-SFT win rate, on held-out
prompts."""

import pytest

from rlhfkit.cli import setup
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import Run

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
