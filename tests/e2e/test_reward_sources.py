"""Built-in reward sources through the CLI: RL against the dataset's labeller with no
reward model, and a weighted sum of a reward model and a rule."""

import json

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow


def test_labeller_reward_runs_rl_with_no_reward_model(tmp_path):
    run_dir = tmp_path / "run"
    # ppo: its value model is a fresh head on SFT (the source has no reward model: no critic_init)
    r = run_cli(SMOKE + ["stages=[sft,rl]", "reward=labeller", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run_dir / "rm").exists()
    table = json.load(open(run_dir / "eval.json"))
    for m in table["policies"].values():  # the reward is the gold labeller: proxy == gold
        assert m["proxy"] == pytest.approx(m["gold"], abs=1e-6)
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    rl = [x for x in rows if x["stage"] == "rl" and "reward/proxy" in x]
    assert len(rl) == 3 and all(-1 < x["reward/proxy"] <= 1.2 for x in rl)


def test_combined_reward_model_plus_length_rule(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["reward=combined", "reward.terms={model: 1.0, length: 0.5}", "+reward.options.length.target=4",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "rm").is_dir()  # the model term needs the rm stage
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    rl = [x for x in rows if x["stage"] == "rl" and "reward/proxy" in x]
    assert len(rl) == 3
    for x in rl:  # the score is the weighted sum of the logged term means
        assert x["reward/proxy"] == pytest.approx(x["reward/term/model"] + 0.5 * x["reward/term/length"], abs=1e-4)
        assert x["reward/term/length"] <= 0


def test_unknown_term_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["reward=combined", "reward.terms={model: 1.0, brevity: 1.0}", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "reward.terms={'model': 1.0, 'brevity': 1.0}: unknown reward source 'brevity'; choose from" in r.stderr
    assert not run_dir.exists()
