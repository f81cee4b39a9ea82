"""GRPO with dynamic sampling through the CLI: a run resumed from its mid-RL checkpoint
ends exactly where the uninterrupted run does. The refill prompts come from the rl stage's
prompt stream, which the checkpoint holds with the RNGs, so the resumed steps draw the same
extra prompts and the same samples."""

import json
import os
import shutil

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow

ARGS = SMOKE + ["sft.steps=8", "rl.steps=3", "checkpoint.every=2", "stages=[sft,rl]", "reward=labeller",
                "algorithm=grpo_dapo", "algorithm.num_generations=2", "logger=[jsonl]"]


def test_dynamic_sampling_resumes_exactly(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_cli(ARGS + [f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert sum(x.get("grpo/refill_rounds", 0) for x in rows if x["stage"] == "rl") > 0  # prompts were drawn mid-step
    first = json.load(open(os.path.join(run_dir, "eval.json")))
    weights = open(os.path.join(run_dir, "rl", "model.safetensors"), "rb").read()
    assert os.listdir(os.path.join(run_dir, "checkpoints", "rl")) == ["step-00000002"]
    shutil.rmtree(os.path.join(run_dir, "rl"))  # as if killed during the last RL step
    os.unlink(os.path.join(run_dir, "eval.json"))
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rl] resuming at step 2" in r.stdout
    assert json.load(open(os.path.join(run_dir, "eval.json")))["policies"] == first["policies"]
    assert open(os.path.join(run_dir, "rl", "model.safetensors"), "rb").read() == weights
