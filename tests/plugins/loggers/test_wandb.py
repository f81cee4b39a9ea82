"""The W&B logger, offline (no account): config, stable metric names, sample tables,
grouping, sweeps' single run, and no secrets."""

import glob
import os

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.loggers.wandb_logger import WandbConfig, WandbLogger

from ...helpers import read_wandb_run


def _offline_runs(root):
    return [read_wandb_run(f) for f in sorted(glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb")))]


def _drive(lg, run_dir):
    config = {"seed": 3, "algorithm": {"_name_": "ppo", "kl_coef": 0.1}, "logger": {"wandb": {"api_key": "topsecret"}}}
    lg.rlhfkit_run_start(run_dir=run_dir, config=config)
    lg.rlhfkit_log_metrics(stage="sft", step=10, metrics={"loss/sft": 1.5})
    lg.rlhfkit_log_metrics(stage="rl", step=1, metrics={"reward/proxy": 0.25, "rollout/kl": 0.5})
    lg.rlhfkit_log_metrics(stage="eval", step=0, metrics={"gold_improvement": 0.07, "rl/gold": 0.8})
    lg.rlhfkit_log_samples(stage="rl", step=0, rows=[{"prompt": "copy a =", "response": "a", "gold": 1.0}])
    lg.rlhfkit_run_end(run_dir=run_dir, summary={"status": "ok", "gold_improvement": 0.07, "win_rate": 0.7})


def test_one_run_per_stage_grouped_by_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    run_dir = str(tmp_path / "2026-11-22_pipeline")
    _drive(WandbLogger(WandbConfig(mode="offline")), run_dir)
    runs = {r["job_type"]: r for r in _offline_runs(run_dir)}
    assert sorted(runs) == ["eval", "rl", "sft"]  # one run per stage...
    assert {r["group"] for r in runs.values()} == {"2026-11-22_pipeline"}  # ...grouped by pipeline
    assert runs["sft"]["summary"]["sft/loss/sft"] == 1.5 and runs["sft"]["summary"]["sft/step"] == 10
    assert runs["rl"]["summary"]["rl/reward/proxy"] == 0.25 and runs["rl"]["summary"]["rl/step"] == 1
    ev = runs["eval"]["summary"]
    assert ev["eval/gold_improvement"] == 0.07 and ev["eval/rl/gold"] == 0.8 and ev["status"] == "ok"
    assert ev["rl/samples/_type"] == "table-file" and ev["rl/samples/nrows"] == 1  # the samples table
    for r in runs.values():
        assert r["config"]["seed"] == 3 and r["config"]["algorithm"]["kl_coef"] == 0.1
        assert r["config"]["logger"]["wandb"]["api_key"] == "***REDACTED***"
    blob = b"".join(open(f, "rb").read() for f in glob.glob(run_dir + "/wandb/**/*", recursive=True) if os.path.isfile(f))
    assert b"topsecret" not in blob


def test_under_a_sweep_agent_the_pipeline_is_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "fake-sweep")
    lg = WandbLogger(WandbConfig(mode="offline"))
    assert not lg.per_stage
    monkeypatch.delenv("WANDB_SWEEP_ID")  # offline: nothing to attach to, but the run layout holds
    _drive(lg, str(tmp_path / "run"))
    (run,) = _offline_runs(str(tmp_path / "run"))
    assert run["job_type"] == "pipeline"
    assert run["summary"]["eval/gold_improvement"] == 0.07 and run["summary"]["sft/loss/sft"] == 1.5  # the sweep's metric


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="offline"):
        WandbLogger(WandbConfig(mode="sometimes"))
