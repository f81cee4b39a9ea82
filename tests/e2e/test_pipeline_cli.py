"""The whole pipeline through the real ``rlhfkit`` command (subprocesses), smoke-sized."""

import json
import os

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "ppo")
    r = _ok(run_cli(SMOKE + [f"hydra.run.dir={run_dir}"], cwd=os.path.dirname(run_dir)))
    return run_dir, r


def test_run_directory_holds_checkpoints_metrics_config_and_eval(default_run):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    run_dir, r = default_run
    for stage in ("sft", "rl"):
        AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, stage))
        AutoTokenizer.from_pretrained(os.path.join(run_dir, stage))
    AutoModel.from_pretrained(os.path.join(run_dir, "rm"))
    assert not [n for n in os.listdir(run_dir) if ".tmp-" in n]  # atomic writes left no debris
    stages = {row["stage"] for row in _metrics(run_dir)}
    assert {"sft", "rm", "rl", "eval"} <= stages
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "_name_: ppo" in f.read()
    with open(os.path.join(run_dir, "eval.json")) as f:
        table = json.load(f)
    assert set(table["policies"]) == {"sft", "rl"}
    for m in table["policies"].values():
        assert {"gold", "proxy", "kl", "eos_rate"} <= set(m)
    assert 0.0 <= table["win_rate"] <= 1.0
    import torch
    import transformers

    env = table["environment"]  # what the figures depend on besides the config
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__ and env["threads"] >= 1
    assert f"torch {torch.__version__}" in r.stdout
    assert "win rate" in r.stdout and "policy" in r.stdout and "rm/accuracy" in r.stdout


def test_same_seed_same_results(default_run, tmp_path):
    run_dir, _ = default_run
    again = str(tmp_path / "again")
    _ok(run_cli(SMOKE + [f"hydra.run.dir={again}"], cwd=str(tmp_path)))
    a = json.load(open(os.path.join(run_dir, "eval.json")))
    b = json.load(open(os.path.join(again, "eval.json")))
    assert a["policies"] == b["policies"] and a["win_rate"] == b["win_rate"]


def test_a2c_from_the_cli(tmp_path):
    run_dir = str(tmp_path / "a2c")
    _ok(run_cli(SMOKE + ["algorithm=a2c", "reward_head=mean_pool", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path)))
    assert "_name_: a2c" in open(os.path.join(run_dir, "config.yaml")).read()
    assert any(row["stage"] == "rl" and "loss/policy" in row for row in _metrics(run_dir))
    assert "rl" in json.load(open(os.path.join(run_dir, "eval.json")))["policies"]


def test_each_stage_runs_alone_from_the_previous_checkpoint(default_run, tmp_path):
    run_dir, _ = default_run
    rm_only = str(tmp_path / "rm_only")
    _ok(run_cli(SMOKE + ["stages=[rm]", f"from_run={run_dir}", "reward_head=mlp", f"hydra.run.dir={rm_only}"], cwd=str(tmp_path)))
    assert os.path.isdir(os.path.join(rm_only, "rm")) and not os.path.exists(os.path.join(rm_only, "sft"))
    rl_only = str(tmp_path / "rl_only")
    # the SFT checkpoint is found by following rm_only's own from_run
    _ok(run_cli(SMOKE + ["stages=[rl]", f"from_run={rm_only}", "reward_head=mlp", f"hydra.run.dir={rl_only}"], cwd=str(tmp_path)))
    assert os.path.isdir(os.path.join(rl_only, "rl"))
    assert json.load(open(os.path.join(rl_only, "eval.json")))["policies"].keys() == {"sft", "rl"}


def test_missing_previous_stage_is_a_clear_error(tmp_path):
    r = run_cli(SMOKE + ["stages=[rl]", f"hydra.run.dir={tmp_path}/x"], cwd=str(tmp_path))
    assert r.returncode == 1
    assert "from_run is not set" in r.stderr and "add 'sft' to stages" in r.stderr


def test_pairwise_rm_loss_and_llama_policy(tmp_path):
    run_dir = str(tmp_path / "llama")
    _ok(run_cli(SMOKE + ["rm.loss=pairwise", "policy.model=tiny-llama", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path)))
    cfg = json.load(open(os.path.join(run_dir, "sft", "config.json")))
    assert cfg["model_type"] == "llama"
    assert any(row["stage"] == "rm" and "loss/rm" in row for row in _metrics(run_dir))


def test_rloo_from_the_cli(tmp_path):
    run_dir = str(tmp_path / "rloo")
    _ok(run_cli(SMOKE + ["algorithm=rloo", "algorithm.rloo_k=2", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path)))
    assert any(row["stage"] == "rl" and "rloo/advantage_std" in row for row in _metrics(run_dir))


def test_from_run_refuses_a_stage_product_that_does_not_match_its_manifest(default_run, tmp_path):
    import shutil

    from rlhfkit.pipeline import Run

    run_dir, _ = default_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    weights = os.path.join(copy, "sft", "model.safetensors")
    with open(weights, "r+b") as f:  # a flipped bit in the last weight: it would load silently
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    r = run_cli(SMOKE + ["stages=[rl]", f"from_run={copy}", f"hydra.run.dir={tmp_path}/rl"], cwd=str(tmp_path))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"{copy}/sft is corrupt or incomplete: model.safetensors does not match its SHA-256 checksum" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "rl", "rl"))
    os.unlink(os.path.join(copy, "sft", "manifest.json"))  # a Hugging Face directory of one's own: taken as it is
    Run.check_product("sft", os.path.join(copy, "sft"))
