"""Built-in reward sources through the CLI: RL against the dataset's labeller with no
reward model, and a weighted sum of a reward model and a rule."""

import json

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow


def test_labeller_reward_runs_rl_with_no_reward_model(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["stages=[sft,rl]", "reward=labeller", "algorithm=rloo", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run_dir / "rm").exists()
    table = json.load(open(run_dir / "eval.json"))
    for m in table["policies"].values():  # the reward is the gold labeller: proxy == gold
        assert m["proxy"] == pytest.approx(m["gold"], abs=1e-6)
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    rl = [x for x in rows if x["stage"] == "rl" and "reward/proxy" in x]
    assert len(rl) == 3 and all(-1 < x["reward/proxy"] <= 1.2 for x in rl)
