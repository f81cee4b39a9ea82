"""Each built-in task suite beside data=synthetic runs the whole pipeline through the CLI
(``experiment=smoke data=<name>``, its data shrunk to smoke size), with a different
critic-free algorithm each and the dpo stage on one (``tests/e2e/test_pipeline_cli.py``
covers PPO and A2C on data=synthetic; ``benchmarks/suites.py`` runs all four on every suite)."""

import json
import os

import pytest

from rlhfkit.plugins.datasets.numbers import NumberTasks, NumbersConfig
from rlhfkit.plugins.datasets.words import WordsConfig, WordTasks

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow

SMALL = ["data.num_demonstrations=256", "data.num_rm_prompts=24", "data.num_rm_test_prompts=8",
         "data.num_rl_prompts=64", "data.num_test_prompts=64"]


@pytest.mark.parametrize("name,suite,algorithm,stages", [
    ("numbers", NumberTasks(NumbersConfig()), "rloo", ["sft", "rm", "rl", "dpo"]),
    ("words", WordTasks(WordsConfig()), "grpo", ["sft", "rm", "rl"]),
])
def test_smoke_run_on_the_suite(name, suite, algorithm, stages, tmp_path):
    run_dir = str(tmp_path / name)
    r = run_cli(SMOKE + [f"data={name}", *SMALL, f"algorithm={algorithm}", f"stages=[{','.join(stages)}]",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.load(open(os.path.join(run_dir, "eval.json")))
    assert set(table["policies"]) == {"sft", *stages} - {"rm"}
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and all(s["prompt"].split()[0] in suite.cfg.FAMILIES for s in samples)
    # the gold column is this suite's labeller, flaw included
    for s in samples:
        assert s["gold"] == pytest.approx(suite.labeller.score_one(s["prompt"], s["response"]))
    vocab = json.load(open(os.path.join(run_dir, "sft", "tokenizer.json")))["model"]["vocab"]
    assert set(suite.flaw.words) <= set(vocab)
