"""The over-optimisation lab end to end: ``experiment=overoptimization`` at smoke size logs
evaluations from step 0 (SFT, d = 0) on, and ``rlhfkit report`` fits Gao et al.'s curve to them."""

import json
import os

import pytest

from ..helpers import run_cli

pytestmark = pytest.mark.slow


def test_overoptimization_run_gives_points_that_report_fits(tmp_path):
    run_dir = str(tmp_path / "no_kl")
    # lr 1e-3: at smoke size the preset's 1e-5 leaves the policy within the KL estimate's noise
    r = run_cli(["experiment=[overoptimization,smoke]", "rl.steps=6", "rl.eval_every=2", "algorithm.lr=1e-3",
                 f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = {row["step"]: row for row in map(json.loads, f) if row["stage"] == "rl" and "eval/gold" in row}
    assert sorted(evals) == [0, 2, 4]  # step 6 is eval.json's rl row
    assert abs(evals[0]["eval/kl"]) < 1e-6 and evals[4]["eval/kl"] > 0  # SFT itself, then moving away
    assert all({"eval/gold", "eval/proxy", "eval/kl", "eval/gold_se"} <= set(row) for row in evals.values())
    assert all(0 < row["eval/gold_se"] < 0.5 for row in evals.values())  # each point says how far chance moves it
    out = str(tmp_path / "report")
    r = run_cli(["report", run_dir, "--label", "smoke no-KL", "--out", out], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| smoke no-KL | rl |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3" and all(c != "-" for c in cells[3:6])  # 3 evaluations after SFT; alpha, beta, R^2
    assert float(cells[5]) <= 1.0
    peak_step = int(cells[6])
    peak_se = evals[peak_step]["eval/gold_se"] if peak_step in evals else json.load(open(os.path.join(run_dir, "eval.json")))["policies"]["rl"]["gold_se"]
    assert cells[13] == f"{peak_se:.3f}"  # the peak's standard error, from its own evaluation
    assert os.path.isfile(os.path.join(out, "rl_gold_vs_d.png")) and os.path.isfile(os.path.join(out, "rl_proxy_vs_d.png"))
